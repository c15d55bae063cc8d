"""A bounded queue of work in flight: futures kept in submission order, at most ``depth`` waiting,
so a producer never runs ahead of its consumer by more than that (memory stays flat in slide size).

Used by the tile reader (reads in flight), the host stage (detection in flight) and the review writer
(batches of review images waiting for the store). No project imports: any package may use it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class InFlight(Generic[T]):
    """Futures in submission order; :meth:`push` waits for the oldest while more than ``depth``
    are pending and returns their results in order."""

    def __init__(self, depth: int) -> None:
        self.depth = max(0, depth)
        self._pending: deque[Future[T]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, future: Future[T]) -> list[T]:
        """Add ``future``; results of the oldest futures beyond ``depth`` (re-raising a failure)."""
        self._pending.append(future)
        done = []
        while len(self._pending) > self.depth:
            done.append(self._pending.popleft().result())
        return done

    def drain(self) -> Iterator[T]:
        """Results of every pending future, oldest first."""
        while self._pending:
            yield self._pending.popleft().result()

    def cancel(self) -> None:
        """Cancel what has not started and forget everything pending."""
        while self._pending:
            self._pending.popleft().cancel()


def bounded_map(submit: Callable[..., Future[U]], fn: Callable[[T], U], items: Iterable[T],
                depth: int) -> Iterator[U]:
    """Ordered ``map`` of ``fn`` over ``items`` through ``submit`` (``pool.submit``) with at most
    ``depth`` calls in flight; stopping early cancels the calls not yet started."""
    queue: InFlight[U] = InFlight(max(1, depth) - 1)
    try:
        for item in items:
            yield from queue.push(submit(fn, item))
        yield from queue.drain()
    finally:
        queue.cancel()
