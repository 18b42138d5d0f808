"""Which collector scrapes which endpoint: rendezvous (highest random weight) hashing, shared by the
collectors (to split the work) and the admin API (to show who scrapes what).

Every collector computes the same owner for an endpoint from the same member
list, so in steady state each endpoint is scraped exactly once. When a member
joins or leaves, only the endpoints it wins or held move.
"""

from __future__ import annotations

from collections.abc import Sequence

import mmh3


def owner(endpoint: str, members: Sequence[str]) -> str:
    return max(members, key=lambda m: (mmh3.hash64(f"{m}|{endpoint}", signed=False)[0], m))


def owned(endpoints: Sequence[str], members: Sequence[str], me: str) -> set[str]:
    """The endpoints `me` scrapes; all of them while the member list is unknown or lacks `me`."""
    if me not in members:
        return set(endpoints)
    return {e for e in endpoints if owner(e, members) == me}
