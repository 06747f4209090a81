"""One thread owns the model: requests wait in a bounded queue and run one at a time.

The HTTP threads only parse, queue and write; the worker runs `backend.chat` and passes each
event to the waiting request through its own unbounded outbox, then a final `END`. A full
queue refuses at once (`QueueFull` -> 503) instead of piling up threads. A request whose client
went away is cancelled: skipped if still queued, stopped at its next event if running.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from kimivl_cli.backends import ChatBackend
from kimivl_cli.errors import KimivlError, RuntimeFailure
from kimivl_cli.serve.protocol import ChatRequest

log = logging.getLogger("kimivl.serve")
END = object()  # the last item of every outbox


class QueueFull(Exception):
    """Every slot (the running request and `queue_size` waiting ones) is taken."""


@dataclass
class Job:
    request: ChatRequest
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # Event | KimivlError | END
    cancelled: threading.Event = field(default_factory=threading.Event)

    def items(self):
        """Everything the worker sends for this job, up to (not including) END."""
        while (item := self.outbox.get()) is not END:
            yield item


class Worker:
    """The single consumer of the queue. `queue_size` waiting requests at most (0: none, a busy
    worker refuses), plus the running one."""

    def __init__(self, backend: ChatBackend, queue_size: int) -> None:
        self.backend = backend
        self.queue_size = queue_size
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._slots = threading.BoundedSemaphore(queue_size + 1)  # running + waiting; freed at END
        self._stop = threading.Event()
        self.running = False
        self.served = 0
        self._thread = threading.Thread(target=self._loop, name="kimivl-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def submit(self, request: ChatRequest) -> Job:
        if not self._slots.acquire(blocking=False):
            raise QueueFull
        job = Job(request)
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
            self._slots.release()
            job.outbox.put(END)
        while True:  # stopping: whoever still waits gets an answer, not a hang
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            self._slots.release()
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
