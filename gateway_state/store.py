"""The typed face of Redis: every read and write the fleet makes goes through here, one class per concern
over one connection. A process takes the whole store; a component types itself against the concern it uses
(flow control a QueueStore, say)."""

from __future__ import annotations

from gateway_state.config_store import ConfigStore
from gateway_state.fleet_store import FleetStore
from gateway_state.kv_index_store import KvIndexStore
from gateway_state.load_store import LoadStore
from gateway_state.placement_store import PlacementStore
from gateway_state.queue_store import QueueStore


class StateStore(ConfigStore, LoadStore, PlacementStore, QueueStore, FleetStore, KvIndexStore):
    """Every concern of the shared state over one Redis (or Redis Cluster) connection."""
