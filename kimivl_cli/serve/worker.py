"""One thread owns the model: requests wait in a bounded queue and run one at a time.

The HTTP threads only parse, queue and write; the worker runs `backend.chat` and passes each
event to the waiting request through its own unbounded outbox, then a final `END`. A request
takes a `Slot` (the running one plus `queue_size` waiting) before its body is read or its images
decoded, so a full server refuses at once (`QueueFull` -> 503) and holds no more decoded requests
than it has slots. A request whose client went away is cancelled: skipped if still queued,
stopped at its next event if running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kimivl_cli.backends import ChatBackend
from kimivl_cli.errors import KimivlError, RuntimeFailure
from kimivl_cli.serve.protocol import ChatRequest

log = logging.getLogger("kimivl.serve")
END = object()  # the last item of every outbox


class QueueFull(Exception):
    """Every slot (the running request and `queue_size` waiting ones) is taken."""


class Slot:
    """A place taken from `slots` (the worker's queue, the server's connections), given back once however
    many threads release it: held from before a request is read until its job (or connection) ends."""

    def __init__(self, slots: threading.Semaphore) -> None:
        self._slots, self._held, self._lock = slots, True, threading.Lock()

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._slots.release()


@dataclass
class Job:
    request: ChatRequest
    slot: Slot
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # Event | KimivlError | END
    cancelled: threading.Event = field(default_factory=threading.Event)

    def items(self, client_gone: Callable[[], bool] | None = None, poll: float = 0.2):
        """Everything the worker sends for this job, up to (not including) END. With `client_gone`,
        asked every `poll` s (whether or not events arrive): the job is cancelled when it says so."""
        check_at = time.monotonic() + poll
        while True:
            try:
                item = self.outbox.get(timeout=poll if client_gone else None)
            except queue.Empty:
                item = None
            if client_gone is not None and time.monotonic() >= check_at:
                check_at = time.monotonic() + poll
                if client_gone():
                    self.cancelled.set()
                    return
            if item is END:
                return
            if item is not None:
                yield item


class Worker:
    """The single consumer of the queue. `queue_size` waiting requests at most, plus the running one."""

    def __init__(self, backend: ChatBackend, queue_size: int) -> None:
        self.backend = backend
        self.queue_size = queue_size
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._slots = threading.BoundedSemaphore(queue_size + 1)  # the running request and the waiting ones
        self._stop = threading.Event()
        self.running = False
        self.served = 0
        self._thread = threading.Thread(target=self._loop, name="kimivl-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def reserve(self) -> Slot:
        """A slot for a request about to be read, or QueueFull at once."""
        if not self._slots.acquire(blocking=False):
            raise QueueFull
        return Slot(self._slots)

    def submit(self, request: ChatRequest, slot: Slot | None = None) -> Job:
        """Queue `request` in its reserved `slot` (taken now when None: QueueFull if none is free)."""
        job = Job(request, slot or self.reserve())
        self._jobs.put(job)
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the running request (its client gets what was generated so far)."""
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if not job.cancelled.is_set():
                self.running = True
                try:
                    self._run(job)
                finally:
                    self.running = False
                    self.served += 1
            job.slot.release()
            job.outbox.put(END)
        while True:  # stopping: whoever still waits gets an answer, not a hang
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            job.slot.release()
            job.outbox.put(RuntimeFailure("the server is shutting down"))
            job.outbox.put(END)

    def _run(self, job: Job) -> None:
        req = job.request
        try:
            events = self.backend.chat(req.messages, req.images, req.options)
            try:
                for event in events:
                    if job.cancelled.is_set() or self._stop.is_set():
                        break
                    job.outbox.put(event)
            finally:
                close = getattr(events, "close", None)
                if close is not None:
                    close()  # frees the KV cache at once when the client left early
        except KimivlError as exc:
            job.outbox.put(exc)
        except Exception as exc:  # a bug or an out-of-memory: the server must outlive it
            log.exception("generation failed")
            job.outbox.put(RuntimeFailure(f"generation failed: {type(exc).__name__}: {exc}"))
