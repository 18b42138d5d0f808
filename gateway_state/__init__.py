"""Shared state of the picker fleet: the Redis schema, records, Lua scripts and codec.

Every process (controller, collector, picker) reads and writes Redis only through
this package, so the schema lives in exactly one place.
"""
