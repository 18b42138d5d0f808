"""The profile handler's roles, and the bootstrap fields the picker adds to a PD request's body."""

from __future__ import annotations

import json
import random

import pytest

from gateway_state.records import Config, Endpoint, PDProfile, Pool, Strategy
from picker.director import with_bootstrap
from picker.errors import NoEndpoint
from picker.intake import Intake
from picker.roles import Mirror, ProfileHandler, Role
from picker.scheduler import Profile
from picker.settings import PrefixSettings

LABEL = "rolebasedgroup.workloads.x-k8s.io/role"


def pod(i: int, role: str = "") -> Endpoint:
    return Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000, {LABEL: role} if role else {})


PD = Pool("ns/pd", (8000,), Strategy.PREFIX_CACHE, endpoints=(pod(1, "prefill"), pod(2, "decode"), pod(3, "decode")),
          pd=PDProfile(LABEL, 34000))
PLAIN = Pool("ns/plain", (8000,), Strategy.DEFAULT, endpoints=(pod(4), pod(5)))
MIRROR = Pool("ns/mirror", (8000,), Strategy.PREFIX_CACHE, endpoints=(pod(6), pod(7)))
CONFIG = Config(1, {p.name: p for p in (PD, PLAIN, MIRROR)}, {})
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "a shared prompt " * 40}]}).encode()


def read(pool: str, mirror: str | None = None):  # type: ignore[no-untyped-def]
    return Intake(PrefixSettings(), 1 << 20, random.Random(1)).read(CONFIG, pool, "/v1/chat/completions", BODY,
                                                                    mirror_pool=mirror)


def test_a_pd_pool_places_its_decode_side_as_primary_and_its_prefill_side_with_the_prompt() -> None:
    roles = ProfileHandler(random.Random(1)).roles(read("ns/pd"), CONFIG)
    by_role = {r.role: r for r in roles}
    assert [r.role for r in roles] == [Role.PRIMARY, Role.PREFILL]
    primary, prefill = by_role[Role.PRIMARY], by_role[Role.PREFILL]
    assert [e.name for e in primary.request.pool.endpoints] == ["pod-2", "pod-3"]
    assert primary.profile == Profile.DECODE
    assert primary.request.block_hashes == [] and primary.request.scheduling.work_blocks == 0
    assert [e.name for e in prefill.request.pool.endpoints] == ["pod-1"]
    assert prefill.profile == Profile.PREFIX_CACHE and prefill.request.block_hashes
    # Both keep the pool's name: their counts live in the pool's state.
    assert primary.request.pool.name == prefill.request.pool.name == "ns/pd"


def test_a_pd_pool_without_one_side_has_no_endpoint() -> None:
    no_prefill = Pool("ns/pd", (8000,), endpoints=(pod(2, "decode"),), pd=PDProfile(LABEL, 34000))
    config = Config(1, {"ns/pd": no_prefill}, {})
    request = Intake(PrefixSettings(), 1 << 20, random.Random(1)).read(config, "ns/pd", "/v1/chat/completions", BODY)
    with pytest.raises(NoEndpoint, match="no ready prefill endpoint"):
        ProfileHandler(random.Random(1)).roles(request, config)


def test_a_mirror_is_placed_in_its_own_pool_by_its_own_strategy_at_its_fraction() -> None:
    handler = ProfileHandler(random.Random(1))
    request = read("ns/plain", "ns/mirror")
    roles = handler.roles(request, CONFIG, Mirror("ns/mirror", 1.0))
    primary, mirror = roles
    assert primary.profile == Profile.DEFAULT and primary.request.block_hashes == []  # DEFAULT: no prefix
    assert mirror.role == Role.MIRROR and mirror.optional and mirror.profile == Profile.PREFIX_CACHE
    assert mirror.request.pool.name == "ns/mirror" and mirror.request.block_hashes  # hashed for the mirror pool
    assert len(handler.roles(request, CONFIG, Mirror("ns/mirror", 0.0))) == 1
    copies = sum(len(handler.roles(request, CONFIG, Mirror("ns/mirror", 0.25))) - 1 for _ in range(2000))
    assert 400 <= copies <= 600
    assert len(handler.roles(request, CONFIG, Mirror("ns/unknown", 1.0))) == 1


def test_bootstrap_fields_are_added_to_the_body_and_win_over_the_clients() -> None:
    for raw in (b'{"model": "m"}', b'{"model": "m", "bootstrap_room": 1}  \n', b'{"model":"m","x":{"y":"}"}}'):
        out = json.loads(with_bootstrap(raw, "10.0.0.1", 34000, 2**62 + 5))
        assert out["bootstrap_host"] == "10.0.0.1" and out["bootstrap_port"] == 34000
        assert out["bootstrap_room"] == 2**62 + 5 and out["model"] == "m"
