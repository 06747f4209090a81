"""`--concurrency`: the bounded order-keeping pool, and the OCR page loop on top of it."""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from kimivl_cli.tasks.ocr import OcrOptions, PageJob, run_pages
from kimivl_cli.tasks.pool import HOLD_FACTOR, ordered_map


class Tracker:
    """Counts calls in flight (and the most at once) and how far the pool read ahead of the consumer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.peak = self.read = 0

    def items(self, n: int):
        for i in range(n):
            self.read += 1
            yield i

    def call(self, delay: float, value: int) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(delay)
        with self.lock:
            self.running -= 1
        return value * 10


@settings(max_examples=25, deadline=None)
@given(
    concurrency=st.integers(1, 5),
    delays=st.lists(st.sampled_from([0.0, 0.001, 0.004]), min_size=0, max_size=24),
)
def test_results_in_input_order_with_bounded_work(concurrency: int, delays: list[float]) -> None:
    tracker = Tracker()
    results = []
    for result in ordered_map(lambda i: tracker.call(delays[i], i), tracker.items(len(delays)), concurrency):
        assert tracker.read <= len(results) + 1 + HOLD_FACTOR * concurrency  # never the whole list at once
        results.append(result)
    assert results == [i * 10 for i in range(len(delays))]
    assert tracker.peak <= concurrency


def test_a_failure_comes_after_the_earlier_results() -> None:
    def work(i: int) -> int:
        time.sleep(random.uniform(0, 0.005))
        if i == 3:
            raise ValueError("page 3 broke")
        return i

    seen = []
    with pytest.raises(ValueError, match="page 3"):
        for result in ordered_map(work, range(8), 4):
            seen.append(result)
    assert seen == [0, 1, 2]


def _page(text: str) -> Image.Image:
    image = Image.new("RGB", (120, 80), "white")
    ImageDraw.Draw(image).text((8, 30), text, fill="black")
    return image


class ListSink:
    def __init__(self) -> None:
        self.records = []

    def write(self, record) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


def test_pages_written_in_order_resumed_pages_never_sent() -> None:
    jobs = [PageJob("scan.tif", i + 1, image=_page(f"page {i + 1}")) for i in range(8)]
    sent: list[int] = []

    def generate(messages: list[dict], images: list) -> str:
        page = int(images[0].info.get("page", 0)) if images[0].info else 0
        sent.append(page)
        time.sleep(random.uniform(0, 0.01))
        return "text"

    for job in jobs:
        job.image.info["page"] = job.page
    sink = ListSink()
    done = {("scan.tif", 2), ("scan.tif", 5)}
    summary = run_pages(jobs, OcrOptions(method="vision", max_side=112), sink, generate, done, concurrency=3)
    assert summary.written == 6
    assert [r.page for r in sink.records] == [1, 3, 4, 6, 7, 8]
    assert sorted(sent) == [1, 3, 4, 6, 7, 8]
