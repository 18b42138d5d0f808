"""From a request body to what the scheduler places: parse, resolve the model, rewrite, hash.

Pure but for the weighted choice of a target model: nothing here reads or
writes shared state, so every failure is a GatewayError decided before any
count is taken.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from gateway_state.block_keys import engine_root, token_keys
from gateway_state.records import ANY_MODEL, Config, KvStreamStatus, LoadSample, Model, Pool, Strategy
from picker.errors import BadRequest, NoEndpoint, NotFound, PickerUnavailable
from picker.plugins.framework import SchedulingRequest
from picker.prefix import block_hashes, work_blocks
from picker.request import ParsedRequest, parse_request
from picker.settings import PrefixSettings
from picker.tokens import EngineTokens


@dataclass(frozen=True)
class PoolEvents:
    """What a pool indexed from engine events tells intake, derived once per snapshot: its engines' block
    size (0 unknown yet), the endpoints whose stream is live, and the model its pods run (a request for
    another is for a LoRA adapter, whose blocks the engine keys apart)."""

    block_size: int = 0
    live: frozenset[str] = frozenset()
    base_model: str = ""

    @classmethod
    def of(cls, streams: Mapping[str, KvStreamStatus], samples: Mapping[str, LoadSample]) -> PoolEvents:
        sizes = Counter(s.block_size for s in streams.values() if s.block_size > 0)
        bases = Counter(s.base_model for s in samples.values() if s.base_model)
        return cls(sizes.most_common(1)[0][0] if sizes else 0, frozenset(e for e, s in streams.items() if s.live),
                   bases.most_common(1)[0][0] if bases else "")


@dataclass(frozen=True)
class PlacementRequest:
    model: str  # as the client named it
    pool: Pool
    body: bytes | None  # the rewritten body, when the target model differs
    block_hashes: list[str]  # the prompt's prefix blocks; empty unless the pool routes by prefix
    scheduling: SchedulingRequest
    # The pool lists the model by name (an InferenceModel or rewrite): only then may the name be a
    # metric label, since a pool that serves any model would otherwise let clients grow the label set.
    listed: bool = False
    tenant: str = ""  # the fairness id: flow control takes turns between tenants of one priority
    queue_ttl_ms: int = 0  # how long it may wait for room (the model's setting, else the pool's)
    # The pool's index comes from engine events: `block_hashes` are the engine's blocks under our keys,
    # and a placement stands for them speculatively until the engine's event (at endpoints whose
    # stream is live; at the others, for the approximate index's lifetime).
    speculative: bool = False
    live_streams: frozenset[str] = frozenset()

    @property
    def target_model(self) -> str:
        return self.scheduling.model

    @property
    def priority(self) -> int:
        return self.scheduling.priority


class Intake:
    def __init__(self, prefix: PrefixSettings, max_body_bytes: int, rng: random.Random,
                 tokens: EngineTokens | None = None, untokenized: Callable[[str], None] | None = None) -> None:
        """`untokenized(pool)`: told of each request to a pool indexed from events whose token ids could not
        be known (a metric)."""
        self._prefix = prefix
        self._max_body_bytes = max_body_bytes
        self._rng = rng
        self._tokens = tokens
        self._untokenized = untokenized

    def read(self, config: Config | None, route_pool: str | None, path: str, raw: bytes,
             subset: frozenset[str] | None = None, mirror_pool: str | None = None,
             objective: str | None = None, tenant: str = "",
             events: Mapping[str, PoolEvents] | None = None) -> PlacementRequest:
        """`subset`: the gateway's hint, the only endpoints (`ip:port`) it may route this request to.
        `mirror_pool`: the pool the route mirrors to, whose strategy may need the prompt's blocks too.
        `objective`: the InferenceObjective the request names (a header); its priority wins over the
        model's criticality. `tenant`: its fairness id. `events`: the snapshot's, per pool indexed from
        engine events."""
        parsed = parse_request(path, raw, self._max_body_bytes)
        if config is None:
            raise PickerUnavailable("no configuration loaded from Redis yet")
        if route_pool is not None and route_pool not in config.pools:
            raise NoEndpoint(f"Pool {route_pool} is not configured.")
        pool = _pool(config, route_pool, parsed.model)
        model = config.model(pool, parsed.model) if pool is not None else None
        if pool is None or model is None:
            raise NotFound(f"The model `{parsed.model}` does not exist.", param="model")
        if not pool.endpoints:
            raise NoEndpoint(f"Pool {pool.name} has no ready endpoint.")
        if subset is not None:
            pool = replace(pool, endpoints=tuple(e for e in pool.endpoints if e.key in subset))
            if not pool.endpoints:
                raise NoEndpoint(f"No endpoint of the gateway's subset ({', '.join(sorted(subset)) or 'empty'}) "
                                 f"is ready in pool {pool.name}.")
        target = self._target(model)
        body = None
        if target != parsed.model:
            try:
                body = json.dumps({**parsed.body, "model": target}, ensure_ascii=False).encode("utf-8",
                                                                                             "surrogatepass")
            except RecursionError:
                raise BadRequest("Request body is nested too deeply.") from None
        p = self._prefix
        hashes: list[str] = []
        live: frozenset[str] = frozenset()
        mirror = config.pools.get(mirror_pool) if mirror_pool else None
        if Strategy.PREFIX_CACHE in (pool.strategy, mirror.strategy if mirror else None):
            if pool.kv_events is not None:
                facts = (events or {}).get(pool.name, PoolEvents())
                engine = self._engine_blocks(path, parsed, target, config.prefix_seed, facts)
                if engine is None and self._untokenized is not None:
                    self._untokenized(pool.name)
                hashes = engine or []
                live = facts.live
            else:
                hashes = block_hashes(parsed.prompt, target, config.prefix_seed, p.block_chars, p.block_tokens,
                                      p.max_blocks)
        named = config.objectives.get(pool.name, {}).get(objective) if objective else None
        priority = named.priority if named is not None else model.priority
        scheduling = SchedulingRequest(target, priority, len(hashes), hashes[0] if hashes else "",
                                       work_blocks(parsed.prompt, p.block_chars, p.block_tokens))
        return PlacementRequest(parsed.model, pool, body, hashes, scheduling,
                                parsed.model in config.models.get(pool.name, {}), tenant,
                                model.queue_ttl_ms or pool.flow.queue_ttl_ms, pool.kv_events is not None, live)

    def _engine_blocks(self, path: str, parsed: ParsedRequest, target: str, seed: int,
                       facts: PoolEvents) -> list[str] | None:
        """The prompt's blocks as the pool's engines cache them: their token ids, in blocks of the size their
        events report, under our keys chained from the adapter (a model other than the one the pods run)
        and the request's cache salt. None when its token ids cannot be known."""
        ids = self._tokens.ids(path, parsed.body, target) if self._tokens else None
        if ids is None:
            return None
        base, salt = facts.base_model, parsed.body.get("cache_salt")
        root = engine_root(target if base and target != base else None, salt if isinstance(salt, str) else None,
                           seed)
        return token_keys(root, ids, facts.block_size or self._prefix.block_tokens, self._prefix.max_blocks, seed)

    def _target(self, model: Model) -> str:
        if len(model.targets) == 1:
            return model.targets[0].name
        return self._rng.choices([t.name for t in model.targets], weights=[t.weight for t in model.targets])[0]


def _pool(config: Config, route_pool: str | None, model: str) -> Pool | None:
    """The route's pool; without one (a gateway that names none), the one pool listing the model, or the only pool."""
    if route_pool is not None:
        return config.pools.get(route_pool)
    listing = [name for name, listed in sorted(config.models.items()) if model in listed]
    if listing:
        return config.pools.get(listing[0])
    return next(iter(config.pools.values())) if len(config.pools) == 1 else None


def models(config: Config | None, pool: str | None) -> list[Model]:
    """The models a route lists (all of them without a route pool), for `GET /v1/models`."""
    if config is None:
        return []
    return [m for name, listed in sorted(config.models.items()) if pool is None or name == pool
            for m in listed.values() if m.name != ANY_MODEL]
