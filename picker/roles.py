"""The profile handler: which placements one request needs, each over its own candidates.

A decision is a set of placements by role (docs/architecture.md), each scheduled by
its own profile and admitted and released on its own:
  - primary: answers the client, with ordered fallbacks Envoy retries in turn
    (in an SGLang prefill/decode pool, a decode endpoint);
  - prefill: an SGLang PD pool's prefill endpoint, which computes the prompt and
    hands its KV cache to the primary (both get the same body and bootstrap room);
  - mirror: a copy for a route's mirror pool, placed by that pool's own strategy
    and state; optional, so it is dropped (never queued) when it cannot be placed.
The handler is pure: it only narrows pools and names profiles; placing is I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from enum import StrEnum

from gateway_state.records import Config, Pool, Strategy
from picker.errors import NoEndpoint
from picker.intake import PlacementRequest
from picker.scheduler import Profile


class Role(StrEnum):
    PRIMARY = "primary"
    PREFILL = "prefill"
    MIRROR = "mirror"


@dataclass(frozen=True)
class Mirror:
    """A route's RequestMirror to an InferencePool: the pool, and the share of requests copied."""

    pool: str
    fraction: float = 1.0


@dataclass(frozen=True)
class RoleRequest:
    role: Role
    request: PlacementRequest  # its pool narrowed to the role's endpoints
    profile: Profile

    @property
    def optional(self) -> bool:
        """Dropped, not failed, when it cannot be placed."""
        return self.role == Role.MIRROR


def _strategy_profile(pool: Pool) -> Profile:
    return Profile.PREFIX_CACHE if pool.strategy == Strategy.PREFIX_CACHE else Profile.DEFAULT


def _for_pool(request: PlacementRequest, pool: Pool, work: bool = True) -> PlacementRequest:
    """The request placed in `pool`: prompt blocks only where the pool routes by prefix (the intake
    hashes for the route's mirror pool too), prefill work only where the endpoint computes the prompt."""
    if pool is request.pool and work and (pool.strategy == Strategy.PREFIX_CACHE or not request.block_hashes):
        return request  # the usual request: placed as it came
    scheduling = request.scheduling
    hashes = request.block_hashes
    if pool.strategy != Strategy.PREFIX_CACHE or pool.pd is not None and not work:
        hashes, scheduling = [], replace(scheduling, prompt_blocks=0, first_block="")
    if not work:
        scheduling = replace(scheduling, work_blocks=0)
    return replace(request, pool=pool, block_hashes=hashes, scheduling=scheduling)


class ProfileHandler:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def roles(self, request: PlacementRequest, config: Config | None,
              mirror: Mirror | None = None) -> list[RoleRequest]:
        """The primary first; raises NoEndpoint when a required role has no endpoint at all."""
        pool = request.pool
        out: list[RoleRequest] = []
        if pool.pd is not None:
            pd = pool.pd
            prefill = replace(pool, endpoints=pool.side("prefill"))
            decode = replace(pool, endpoints=pool.side("decode"))
            for side, narrowed in (("prefill", prefill), ("decode", decode)):
                if not narrowed.endpoints:
                    raise NoEndpoint(f"Pool {pool.name} has no ready {side} endpoint (pods labelled "
                                     f"{pd.role_label}={getattr(pd, side + '_role')}).")
            # The decode side computes no prompt and keeps no prefix of it: no blocks, no prefill work.
            out.append(RoleRequest(Role.PRIMARY, _for_pool(request, decode, work=False), Profile.DECODE))
            out.append(RoleRequest(Role.PREFILL, _for_pool(request, prefill), _strategy_profile(pool)))
        else:
            out.append(RoleRequest(Role.PRIMARY, _for_pool(request, pool), _strategy_profile(pool)))
        target = config.pools.get(mirror.pool) if config is not None and mirror is not None else None
        if target is not None and target.endpoints and mirror is not None and self._rng.random() < mirror.fraction:
            # Sheddable on the mirror pool: a saturated mirror pool drops the copy instead of queueing it.
            out.append(RoleRequest(Role.MIRROR, replace(_for_pool(request, target), listed=False),
                                   _strategy_profile(target)))
        return out
