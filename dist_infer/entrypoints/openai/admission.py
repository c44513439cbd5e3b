"""``--max-waiting``: how many sequences may wait to start, counted when a request is admitted.

A request asks for ``prompts x n`` sequences (one engine request each). The server admits it only if

    waiting + prompts x n <= max_waiting,   where waiting = max(reserved, engine_waiting)

``reserved`` is the server's own count: sequences admitted whose first output has not come back yet (a
sequence leaves the count at its first output, or when its request ends, whichever is first).
``engine_waiting`` is what the engine says waits (preempted requests, other clients of a named Ray engine);
it only ever raises the count. The check and the reservation are one synchronous call with no ``await``
between them, so a burst of concurrent requests on the event loop cannot all pass the check before any is
counted.

A request larger than the whole limit is admitted when nothing waits, so it is not refused forever; while
anything waits it gets 429 like the rest. Refused requests get 429 with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Callable

from dist_infer.entrypoints.openai.errors import OpenAIError


class Admission:
    def __init__(self, limit: int | None, engine_waiting: Callable[[], int]):
        """``limit``: ``max_waiting`` (>= 1, checked by ``ServerSettings``), or None for no limit."""
        self.limit, self.engine_waiting = limit, engine_waiting
        self.reserved = 0

    def reserve(self, count: int) -> Reservation:
        """Admits ``count`` sequences or raises a 429; the caller releases them through the reservation."""
        if self.limit is not None:
            waiting = max(self.reserved, self.engine_waiting())
            if waiting and waiting + count > self.limit:
                what = (f"this request's {count} sequences (prompts x n) exceed the limit of {self.limit}; it is "
                        f"admitted only when nothing waits" if count > self.limit else
                        f"{waiting} of {self.limit} sequences are waiting, this request adds {count}")
                raise OpenAIError(429, f"the server's waiting queue is full: {what}; retry later", code="queue_full",
                                  headers={"Retry-After": "1"})
        self.reserved += count
        return Reservation(self, count)


class Reservation:
    """The admitted sequences of one request, released one by one (by index) or all at once; idempotent."""

    def __init__(self, admission: Admission, count: int):
        self._admission = admission
        self._held = set(range(count))

    def release(self, index: int) -> None:
        if index in self._held:
            self._held.discard(index)
            self._admission.reserved -= 1

    def release_all(self) -> None:
        self._admission.reserved -= len(self._held)
        self._held.clear()
