"""Collector: scrapes every endpoint's /metrics and publishes load samples to Redis."""
