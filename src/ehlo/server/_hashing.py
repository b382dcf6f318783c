"""Password verification off the event loop, bounded in threads, queue and waiting time.

This module owns :class:`VerifierPool`: the few threads that run Argon2id
verifications (64 MiB and a fraction of a second each), the queue of logins
waiting for one of them, and what happens at shutdown. However many clients
try to log in at once, at most ``workers`` verifications run, at most
``max_waiting`` logins wait, and none waits longer than ``timeout`` seconds;
every other login is told to try again later (:class:`VerifierBusy`), so
AUTH always answers and memory stays bounded. :meth:`VerifierPool.close`
refuses the waiting logins at once and drops the threads without waiting
for them; a running verification ends on its own within one hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["VerifierBusy", "VerifierPool"]

_T = TypeVar("_T")


class VerifierBusy(Exception):
    """No verification could start in time (or the server is stopping): try again later."""


class VerifierPool:
    """At most ``workers`` verifications at once; ``max_waiting`` queued, ``timeout`` s each."""

    def __init__(self, workers: int, max_waiting: int, timeout: float) -> None:
        if workers < 1:
            raise ValueError("a VerifierPool needs a worker")
        self.workers = workers
        self.max_waiting = max_waiting
        self.timeout = timeout
        self._running = 0  # slots taken: verifications submitted and not yet done
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def running(self) -> int:
        """Verifications in progress."""
        return self._running

    @property
    def waiting(self) -> int:
        """Logins waiting for a verification thread."""
        return len(self._waiting)

    async def run(self, func: Callable[..., _T], *args: object) -> _T:
        """``func(*args)`` in a verification thread; :class:`VerifierBusy` if it cannot start."""
        if self._closed:
            raise VerifierBusy("stopping")
        if self._running < self.workers and not self._waiting:
            self._running += 1
        else:
            await self._wait_turn()
        # A slot is ours from here: _release gives it back once the thread is done.
        loop = asyncio.get_running_loop()
        try:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, "ehlo-auth")
            future: Future[_T] = self._executor.submit(func, *args)
        except RuntimeError:  # shut down meanwhile
            self._release()
            raise VerifierBusy("stopping") from None
        except BaseException:
            self._release()
            raise
        future.add_done_callback(functools.partial(_call_in_loop, loop, self._release))
        # Cancelled (the connection closed): the thread still finishes its
        # verification, and only then is the slot free again.
        return await asyncio.wrap_future(future)

    async def _wait_turn(self) -> None:
        if len(self._waiting) >= self.max_waiting:
            raise VerifierBusy("queue full")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        handed = False
        try:
            async with asyncio.timeout(self.timeout):
                await turn
            handed = True
        except TimeoutError:
            raise VerifierBusy("no verification thread in time") from None
        finally:
            if not handed:
                if turn.done() and not turn.cancelled() and turn.exception() is None:
                    self._release()  # a slot was handed over but cannot be used now
                else:
                    turn.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(turn)

    def _release(self) -> None:
        """A slot is free: hand it to the first login still waiting, or give it back."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._running -= 1

    def close(self) -> None:
        """Refuse the waiting logins and new ones; let the threads go without waiting."""
        self._closed = True
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_exception(VerifierBusy("stopping"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _call_in_loop(loop: asyncio.AbstractEventLoop, func: Callable[[], None], _: object) -> None:
    """Run ``func`` in ``loop``'s thread (a thread's future is done); nothing if it closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(func)
