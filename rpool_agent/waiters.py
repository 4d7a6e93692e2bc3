"""The allocator's queue of waiting requests: order, lookups, deadlines, whose turn it is.

First come, first served with safe backfill (docs/allocation.md): a waiter may be served
only when no earlier waiter still waiting needs any of its types. So a waiter's turn
comes when it is first in line for every type it needs, and the queue keeps one line
per type. A walk (`walk`) offers only those waiters, in arrival order, and when one is
served looks only at who is next in its types' lines: its cost grows with the waiters
served and the number of types, not with the waiters that cannot be served. Whether an
offered waiter is served is the allocator's decision.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import RequestError
from .lease import OwnerKey
from .requests import Request
from .tables import Shape


@dataclass(eq=False)
class Waiter:
    seq: int
    owner: OwnerKey
    req_id: Any
    request: Request
    types: frozenset[str]
    shape: Shape
    since: float
    deadline: float | None
    label: str | None
    holder: dict[str, Any]


class WaitQueue:
    """Waiters in arrival order, with the indexes the allocator's inputs need."""

    def __init__(self) -> None:
        self._queue: dict[int, Waiter] = {}  # seq -> waiter, arrival order
        self._by_key: dict[tuple[OwnerKey, Any], int] = {}
        self._by_owner: dict[OwnerKey, dict[int, None]] = {}
        self.types: dict[str, int] = {}  # type -> how many waiters need it
        # type -> seqs of the waiters that need it, arrival order; entries of waiters that
        # left are dropped when they reach the front (or all at once if they pile up)
        self._lines: dict[str, deque[int]] = {}
        self._deadlines: list[tuple[float, int]] = []  # heap; stale entries skipped lazily
        self._seq = 0

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Waiter]:
        """Waiters, first in line first."""
        return iter(self._queue.values())

    def get(self, owner: OwnerKey, req_id: Any) -> Waiter | None:
        """The waiter `req_id` of `owner`; TypeError if `req_id` is unhashable."""
        seq = self._by_key.get((owner, req_id))
        return None if seq is None else self._queue[seq]

    def owned(self, owner: OwnerKey) -> list[Waiter]:
        return [self._queue[seq] for seq in self._by_owner.get(owner, ())]

    def add(
        self,
        owner: OwnerKey,
        req_id: Any,
        shape: Shape,
        now: float,
        deadline: float | None,
        label: str | None,
        holder: dict[str, Any],
    ) -> Waiter:
        self._seq += 1
        w = Waiter(
            self._seq,
            owner,
            req_id,
            shape.request,
            shape.types,
            shape,
            now,
            deadline,
            label,
            holder,
        )
        self._queue[w.seq] = w
        self._by_key[owner, req_id] = w.seq
        self._by_owner.setdefault(owner, {})[w.seq] = None
        for t in w.types:
            self.types[t] = self.types.get(t, 0) + 1
            line = self._lines.get(t)
            if line is None:
                line = self._lines[t] = deque()
            line.append(w.seq)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, w.seq))
        return w

    def drop(self, w: Waiter) -> None:
        del self._queue[w.seq]
        del self._by_key[w.owner, w.req_id]
        mine = self._by_owner[w.owner]
        del mine[w.seq]
        if not mine:
            del self._by_owner[w.owner]
        for t in w.types:
            n = self.types[t] - 1
            line = self._lines[t]
            if not n:
                del self.types[t], self._lines[t]
                continue
            self.types[t] = n
            if line[0] == w.seq:
                line.popleft()
            elif len(line) > 2 * n + 64:
                self._lines[t] = deque(s for s in line if s in self._queue)
        # stale deadline entries are skipped lazily; rebuild if they pile up
        if len(self._deadlines) > 2 * len(self._queue) + 64:
            self._deadlines = [(d, s) for d, s in self._deadlines if s in self._queue]
            heapq.heapify(self._deadlines)

    def walk(self, serve: Callable[[Waiter], bool]) -> list[Waiter]:
        """Offer each waiter whose turn it is to `serve`, in arrival order, and drop those
        it serves (returned, in order). A waiter not served keeps its types blocked."""
        turn = [w.seq for w in self._firsts()]
        heapq.heapify(turn)
        served: list[Waiter] = []
        while turn:
            w = self._queue[heapq.heappop(turn)]
            if not serve(w):
                continue
            self.drop(w)
            served.append(w)
            for t in w.types:  # who is next in these lines may have its turn now
                nxt = self._first(t)
                if nxt is not None and self._has_turn(nxt) and nxt.seq not in turn:
                    heapq.heappush(turn, nxt.seq)
        return served

    def _firsts(self) -> list[Waiter]:
        """The waiters first in line for every type they need."""
        heads = {self._first(t) for t in list(self._lines)}
        return [w for w in heads if w is not None and self._has_turn(w)]

    def _first(self, rtype: str) -> Waiter | None:
        line = self._lines.get(rtype)
        if line is None:
            return None
        while line[0] not in self._queue:  # a waiter that left: forget it now
            line.popleft()
        return self._queue[line[0]]

    def _has_turn(self, w: Waiter) -> bool:
        return all(self._first(t) is w for t in w.types)

    def pop_due(self, now: float) -> list[Waiter]:
        """Drop and return every waiter whose deadline is <= now, earliest first."""
        due: list[Waiter] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, seq = heapq.heappop(self._deadlines)
            w = self._queue.get(seq)
            if w is None or w.deadline != deadline:
                continue
            self.drop(w)
            due.append(w)
        return due

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and heap[0][1] not in self._queue:
            heapq.heappop(heap)
        return heap[0][0] if heap else None


def deadline(now: float, timeout: float | None) -> float | None:
    """When a request submitted at `now` with `timeout` stops waiting (None: never)."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or math.isnan(timeout):
        raise RequestError(f"timeout must be a number of seconds or null, not {timeout!r}")
    if timeout < 0:
        raise RequestError(f"timeout must be >= 0, not {timeout:g}")
    if math.isinf(timeout):
        return None
    return now + timeout


def check_hashable(value: Any, what: str) -> None:
    try:
        hash(value)
    except TypeError:
        raise RequestError(f"{what} must be a string or a number") from None
