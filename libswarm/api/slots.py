"""How many completions run at once and who waits for one: api.max_concurrent slots, a first
come, first served queue of at most api.max_queued requests, and the Retry-After of a request
refused beyond it."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request

from libswarm.api.errors import ApiError

POLL_S = 0.2  # how often a request waiting for tokens checks that its client is still there


class Slots:
    """api.max_concurrent completions at once (each choice is an inference session); a request
    that finds too few free waits its turn, first come first served, while at most
    api.max_queued wait; one more is answered 429 with Retry-After. Taken and waited for on the
    event loop, given back from the decoding threads."""

    def __init__(self, total: int, max_waiting: int):
        self.total, self.free, self.max_waiting = total, total, max_waiting
        self.waiting: list[tuple[int, asyncio.Future]] = []  # (slots wanted, woken with them), in order
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ended: list[float] = []  # when recent completions ended and how long they ran (Retry-After)

    async def take(self, k: int, request: Request) -> bool:
        """k slots, once free; False when the client left while waiting."""
        self.loop = asyncio.get_running_loop()
        if not self.waiting and self.free >= k:
            self.free -= k
            return True
        if len(self.waiting) >= self.max_waiting:
            raise ApiError(429, f"{self.total} completions are running and {len(self.waiting)} requests wait "
                           "(api.max_concurrent, api.max_queued); try again shortly", "rate_limit_error",
                           code="too_many_requests", headers={"Retry-After": str(self.retry_after())})
        turn: asyncio.Future = self.loop.create_future()
        entry = (k, turn)
        self.waiting.append(entry)
        try:
            while not turn.done():
                try:
                    await asyncio.wait_for(asyncio.shield(turn), POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self._leave(entry)
                        return False
        except BaseException:  # cancelled while waiting or as its turn came
            if turn.done():
                self.give(k)
            else:
                self._leave(entry)
            raise
        return True

    def _leave(self, entry: tuple[int, asyncio.Future]) -> None:
        self.waiting.remove(entry)
        self._wake()  # those behind it may fit now

    def give(self, k: int) -> None:
        """k slots back (on the event loop)."""
        self.free += k
        self._wake()

    def give_from_thread(self, k: int, ran_s: float) -> None:
        self.ended = [*self.ended[-15:], ran_s]
        loop = self.loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: swarm-api is stopping
            loop.call_soon_threadsafe(self.give, k)

    def _wake(self) -> None:
        while self.waiting and self.free >= self.waiting[0][0]:
            k, turn = self.waiting.pop(0)
            self.free -= k
            turn.set_result(None)

    def retry_after(self) -> int:
        """Seconds until a try may find room: how long a completion has lately run, over how many
        run at once, times the requests already waiting (1 s at least)."""
        if not self.ended:
            return 1
        typical = sorted(self.ended)[len(self.ended) // 2]
        return max(1, min(60, round(typical * (1 + len(self.waiting)) / max(1, self.total))))
