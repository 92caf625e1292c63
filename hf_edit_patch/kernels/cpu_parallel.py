"""Blocks of work shared by CPU threads, safe against a thread that another process deschedules.

A selection on a 576x1536 matrix takes a few milliseconds, so a thread that the kernel deschedules for one
scheduler slice while it holds a block would double it. `parallel` hands items out one at a time, in order, and the
calling thread, once none is left, computes again any item whose holder has taken more than twice as long as the
slowest item so far. `Claims` lets only the first copy of an item write its results; the other copy's are dropped,
so a late thread never writes into arrays its caller already uses or has handed back, and what it reads does not
matter. NumPy releases the GIL in its loops, so threads running NumPy on large blocks run in parallel.

Example:
    ```python
    >>> import numpy as np
    >>> from hf_edit_patch.kernels.cpu_parallel import Claims, parallel
    >>> data, sums = np.arange(12.0).reshape(4, 3), np.zeros(4)
    >>> claims = Claims(4)
    >>> def work(i, scratch):
    ...     total = data[i].sum()  # computed by any thread, maybe twice
    ...     claims.commit(i, sums.__setitem__, i, total)  # written once
    >>> parallel(work, claims, threads=2, scratch=lambda: None)
    >>> sums.tolist()
    [3.0, 12.0, 21.0, 30.0]
    ```
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["Claims", "parallel", "thread_pool"]


class Claims:
    """The items of one parallel run: handed out in order (`take`), and written by the first thread to finish each
    (`commit`); `overdue` names the items whose holder is late."""

    _TAKEN, _WRITING, _DONE = 1, 2, 3

    def __init__(self, n_items: int) -> None:
        self._lock = threading.Lock()
        self._state = bytearray(n_items)
        self._taken_at = [0.0] * n_items
        self._next = 0
        self._left = n_items
        self._all_done = threading.Event()
        self._closed, self._writing = False, 0
        self.slowest = 0.0  # seconds: the longest any thread took to compute an item so far
        if n_items == 0:
            self._all_done.set()

    def take(self) -> int | None:
        """The next item nobody has taken, or None."""
        with self._lock:
            i = self._next
            if i >= len(self._state):
                return None
            self._next, self._state[i], self._taken_at[i] = i + 1, self._TAKEN, time.perf_counter()
            return i

    def overdue(self) -> tuple[list[int], float]:
        """Items whose holder has taken more than twice as long as the slowest item so far (plus 0.2 ms), and the
        seconds until the next one will have."""
        now, late, wait = time.perf_counter(), [], 1.0
        allowed = 2 * self.slowest + 2e-4
        with self._lock:
            for i, state in enumerate(self._state):
                if state == self._TAKEN:
                    left = self._taken_at[i] + allowed - now
                    if left <= 0:
                        late.append(i)
                    else:
                        wait = min(wait, left)
        return late, wait

    def commit(self, i: int, write: Callable[..., None], *args) -> None:
        """Runs `write(*args)` for item i unless another thread has written (or is writing) it, or the run is
        closed."""
        with self._lock:
            if self._state[i] >= self._WRITING or self._closed:
                return
            self._state[i] = self._WRITING
            self._writing += 1
        try:
            write(*args)
        except BaseException:
            with self._lock:
                self._state[i] = self._TAKEN  # for the calling thread to redo
                self._writing -= 1
            raise
        with self._lock:
            self._state[i] = self._DONE
            self._writing -= 1
            self._left -= 1
            if self._left == 0:
                self._all_done.set()

    def close(self) -> None:
        """Ends the run early (the calling thread gives up on an error): no write starts any more, and the ones under
        way are waited for, so that nothing is written after the caller has moved on."""
        with self._lock:
            self._closed = True
        while True:
            with self._lock:
                if self._writing == 0:
                    return
            time.sleep(1e-4)

    def wait(self, timeout: float) -> bool:
        """Whether every item is written, waiting up to `timeout` seconds for it."""
        return self._all_done.wait(timeout)


class _Pool:
    """One thread pool kept between calls (starting threads for each pass would cost a good part of a small
    selection), dropped in a forked child, whose copy would have no threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock, self._pool, self._size = threading.Lock(), None, 0

    def get(self, size: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._size < size:
                old, self._pool, self._size = self._pool, ThreadPoolExecutor(size, "hep-cpu"), size
                if old is not None:
                    old.shutdown(wait=False)
            return self._pool


_POOL = _Pool()


def thread_pool(size: int) -> ThreadPoolExecutor:
    """The shared pool, with at least `size` threads."""
    return _POOL.get(size)


def parallel(
    work: Callable[[int, object], None],
    claims: Claims,
    threads: int,
    *,
    scratch: Callable[[], object],
    first: Callable[[], None] | None = None,
) -> None:
    """Runs `work(i, scratch())`, which ends with `claims.commit(i, ...)`, for every item of `claims` on `threads`
    threads (this one included); returns once every item is written.

    `scratch()` gives the calling thread's buffers (called once per thread). `first`, if given, runs on this thread
    before it takes items, while the others start on them. NumPy's floating-point warnings are off in `work`: the
    errors state is per thread.
    """

    def run(i: int, buffers: object) -> None:
        start = time.perf_counter()
        work(i, buffers)
        claims.slowest = max(claims.slowest, time.perf_counter() - start)

    def worker() -> None:
        buffers = scratch()
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            while (i := claims.take()) is not None:
                run(i, buffers)

    if threads > 1:
        pool = thread_pool(threads - 1)
        for _ in range(threads - 1):
            pool.submit(worker)  # a failing worker leaves its item taken, and this thread redoes it
    try:
        if first is not None:
            first()
        worker()
        buffers = scratch()
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            while not claims.wait(0):
                late, wait = claims.overdue()
                for i in late:
                    run(i, buffers)
                if not late:
                    claims.wait(wait)  # until the next item is overdue, or all are written
    except BaseException:
        claims.close()
        raise
