"""Flow control's queue, one per pool, shared by every picker replica (scripts ENQUEUE, DISPATCH, LEAVE)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from redis.asyncio import Redis, RedisCluster

from gateway_state import keys, scripts
from gateway_state.redis_state import RedisState
from gateway_state.script_link import ScriptLink


class QueueStore(RedisState):
    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        super().__init__(redis, link)
        self._enqueue = redis.register_script(scripts.ENQUEUE)
        self._dispatch = redis.register_script(scripts.DISPATCH)
        self._leave = redis.register_script(scripts.LEAVE)

    async def enqueue(self, pool: str, replica: str, priority: int, tenant: str, ttl_ms: int,
                      max_queued: int) -> str | None:
        """Queue a request owned by `replica`; its ticket, or None when the queue is full."""
        ticket = await self._enqueue(keys=[keys.queue(pool)], args=[
            keys.pool_prefix(pool), replica, priority, tenant, ttl_ms, max_queued])
        return ticket.decode() if ticket else None

    async def dispatch(self, pool: str, replica: str, room: int, grant_ms: int,
                       reserve: int = 0) -> tuple[list[tuple[str, str]], int]:
        """Let up to `room` (less the outstanding grants) waiting requests go, in order, those of
        priority 0 or less only while more than `reserve` is free; returns the (owner, ticket) pairs
        let through and how many dead or expired tickets were dropped."""
        flat, dropped = await self._dispatch(keys=[keys.queue(pool)], args=[
            keys.pool_prefix(pool), room, grant_ms, replica, pool, reserve])
        return [(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2)], int(dropped)

    async def leave(self, pool: str, ticket: str) -> str:
        """The ticket leaves the queue; returns whether it was 'waiting', 'granted' or 'gone'."""
        state: bytes = await self._leave(keys=[keys.queue(pool)], args=[keys.pool_prefix(pool), ticket])
        return state.decode()

    async def ticket_states(self, pool: str, tickets: Sequence[str]) -> dict[str, str]:
        """ticket -> 'waiting', 'granted' or 'gone': what a replica checks when a grant message may be lost."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zmscore(keys.queue(pool), list(tickets))
            pipe.zmscore(keys.queue_grants(pool), list(tickets))
            waiting, granted = await pipe.execute()
        return {t: "waiting" if w is not None else "granted" if g is not None else "gone"
                for t, w, g in zip(tickets, waiting, granted, strict=True)}

    async def grants(self, replica: str) -> AsyncIterator[tuple[str, str]]:
        """(pool, ticket) each time another replica lets one of `replica`'s waiting requests go."""
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(keys.grants_channel(replica))
            async for message in pubsub.listen():
                if message["type"] == "message":
                    pool, _, ticket = message["data"].decode().partition("\n")
                    yield pool, ticket

    async def queue_view(self, pool: str) -> tuple[list[tuple[str, int, int, int, str]], int]:
        """Every waiting request as (owner, priority, deadline ms, enqueued ms, tenant), in arrival order,
        and how many grants are outstanding."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(keys.queue(pool), 0, -1)
            pipe.hgetall(keys.queue_tickets(pool))
            pipe.zcard(keys.queue_grants(pool))
            order, metas, grants = await pipe.execute()
        out = []
        for ticket in order:
            meta = metas.get(ticket)
            if meta is not None:
                owner, priority, deadline, enqueued, tenant = meta.decode().split("|", 4)
                out.append((owner, int(priority), int(deadline), int(enqueued), tenant))
        return out, int(grants)
