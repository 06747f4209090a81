"""A bounded, order-keeping thread pool for batch commands (`ocr`, `video-scenes` with `--concurrency`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

HOLD_FACTOR = 4
"""Finished results held back behind a slow earlier one, per worker, before submitting stops."""


def ordered_map(fn: Callable[[T], R], items: Iterable[T], concurrency: int = 1) -> Iterator[R]:
    """`fn` over `items`, at most `concurrency` calls running, results yielded in input order.

    A result is yielded as soon as it and every earlier one are done; finished later ones are
    held meanwhile, at most `HOLD_FACTOR x concurrency` of them, so a million items never become
    a million futures and memory stays O(concurrency). `items` is consumed lazily, in the calling
    thread (so it may do work that is not thread-safe, such as rendering PDF pages).

    An exception from `fn` is raised when its item's turn comes (earlier results are yielded
    first). Closing the iterator early (an error, Ctrl-C) cancels what has not started; calls
    already running are left to finish in the background.
    """
    if concurrency <= 1:
        yield from map(fn, items)
        return
    source = iter(items)
    window: dict[int, Future[R]] = {}  # submitted, not yet yielded, by input index
    next_in = next_out = 0
    exhausted = False
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="kimivl-pool")
    try:
        while True:
            running = [f for f in window.values() if not f.done()]
            while not exhausted and len(running) < concurrency and next_in - next_out < HOLD_FACTOR * concurrency:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                window[next_in] = future = pool.submit(fn, item)
                running.append(future)
                next_in += 1
            head = window.get(next_out)
            if head is None:
                return  # nothing submitted and nothing left: done
            if not head.done():
                wait(running, return_when=FIRST_COMPLETED)
                continue
            del window[next_out]
            next_out += 1
            yield head.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
