"""A block-level KV cache with prefix sharing and LRU eviction, as vLLM's.

Full blocks are named by a hash chained over their tokens (`simulator/block_hashes.py`), so a
block is shared by every sequence whose prompt starts with the same tokens. Blocks no running
sequence references stay cached until space is needed, oldest first. Usage
counts only referenced blocks, as vLLM's `kv_cache_usage_perc` does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence


class KVCache:
    def __init__(self, num_blocks: int, on_evict: Callable[[Hashable], None] | None = None) -> None:
        self.num_blocks = num_blocks
        self._refs: dict[Hashable, int] = {}  # hashed block -> sequences referencing it
        self._evictable: OrderedDict[Hashable, None] = OrderedDict()  # cached, unreferenced, oldest first
        self._private = 0  # blocks held by sequences but not (yet) shared: partial or in-flight
        self._on_evict = on_evict  # told of each cached block whose space is reused

    def holds(self, h: Hashable) -> bool:
        return h in self._refs

    def cached(self) -> set[Hashable]:
        """Every block the prefix cache holds (referenced or not)."""
        return set(self._refs)

    def reset(self) -> bool:
        """Forget every cached block, as a prefix-cache reset does; refused while sequences hold blocks."""
        if self.used_blocks:
            return False
        self._refs.clear()
        self._evictable.clear()
        return True

    @property
    def used_blocks(self) -> int:
        return len(self._refs) - len(self._evictable) + self._private

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks

    def free_blocks(self) -> int:
        return self.num_blocks - self.used_blocks

    def cached_prefix(self, hashes: Sequence[Hashable]) -> int:
        """Number of leading blocks already cached."""
        n = 0
        for h in hashes:
            if h not in self._refs:
                break
            n += 1
        return n

    def can_allocate(self, n: int, reuse: Sequence[Hashable] = ()) -> bool:
        # Blocks about to be reused stop being evictable, so they cannot make room.
        reclaim = sum(1 for h in reuse if h in self._evictable)
        return self.free_blocks() - reclaim >= n

    def acquire(self, hashes: Sequence[Hashable]) -> None:
        """Reference cached blocks for a new sequence."""
        for h in hashes:
            self._refs[h] += 1
            self._evictable.pop(h, None)

    def allocate_private(self, n: int) -> bool:
        if self.free_blocks() < n:
            return False
        self._make_room(n)
        self._private += n
        return True

    def free_private(self, n: int) -> None:
        self._private -= n

    def publish(self, hashes: Sequence[Hashable]) -> int:
        """Turn a sequence's freshly computed private blocks into shared, cached ones.

        Returns how many private blocks were consumed; a block another sequence
        published meanwhile is shared instead and the private copy is freed.
        """
        for h in hashes:
            self._private -= 1
            if h in self._refs:
                self._refs[h] += 1
                self._evictable.pop(h, None)
            else:
                self._refs[h] = 1
        return len(hashes)

    def release(self, hashes: Sequence[Hashable]) -> None:
        """A sequence's blocks, last first, as vLLM frees them: its tail is evicted before its prefix."""
        for h in reversed(hashes):
            self._refs[h] -= 1
            if self._refs[h] == 0:
                self._evictable[h] = None

    def _make_room(self, n: int) -> None:
        while len(self._refs) + self._private + n > self.num_blocks and self._evictable:
            h, _ = self._evictable.popitem(last=False)
            del self._refs[h]
            if self._on_evict is not None:
                self._on_evict(h)
