"""Micro-batching: concurrent requests coalesce into one `detect_batch` call.

Callers are admitted against a bound on images in flight (decode, queue and run); past it
they get `QueueFull` at once rather than waiting. One worker thread takes a job, keeps
collecting until `max_batch` images or `max_wait_s`, runs the batch and answers every job.
A job whose caller gave up (timeout) before it ran is skipped, and its images count as in
flight until then: they are still in memory, so a stalled backend fills the bound and new
callers get `QueueFull` instead of growing the queue. `close()` answers everything already
admitted before it returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import QueueFull
from ..stages.images import ImageInput

log = logging.getLogger(__name__)


@dataclass
class Places:
    """In-flight places held by one request; `submit` hands them to its job."""

    n: int
    handed_over: bool = False


@dataclass
class Job:
    images: list[ImageInput]
    places: int = 0  # given back by the worker when it is done with the job
    future: Future = field(default_factory=Future)


class Admission:
    """The bound on images in flight at one gateway, whatever runs them (this process's
    Batcher, or Ray Serve replicas): `admit` or QueueFull, places handed to a job, and a close
    that refuses new requests and waits for the admitted ones."""

    def __init__(self, max_in_flight: int):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self._lock = threading.Condition()  # close() waits on it from a thread
        self.in_flight = 0
        self.queued = 0  # images admitted and not yet taken into a batch (the queue depth)
        self._closed = False

    @contextmanager
    def admit(self, n: int = 1):
        """Hold `n` in-flight places for one request, or raise QueueFull. Pass what this yields
        to `submit`: the places then stay taken until the worker is done with the job, even if
        the caller stops waiting; otherwise they come back when the `with` block ends."""
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self.in_flight + n > self.max_in_flight:
                raise QueueFull(f"{self.in_flight} images in flight (limit {self.max_in_flight})")
            self.in_flight += n
        places = Places(n)
        try:
            yield places
        finally:
            if not places.handed_over:
                self._release(n)

    def _release(self, n: int) -> None:
        with self._lock:
            self.in_flight -= n
            self._lock.notify_all()

    def _drain(self, timeout_s: float | None) -> None:
        with self._lock:
            self._closed = True
            self._lock.wait_for(lambda: self.in_flight == 0, timeout_s)


class Batcher(Admission):
    def __init__(self, runtime, *, max_batch: int = 4, max_wait_s: float = 0.01, max_in_flight: int = 32,
                 on_batch=None):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        super().__init__(max_in_flight)
        self.runtime, self.max_batch, self.max_wait_s = runtime, max_batch, max_wait_s
        self.on_batch = on_batch  # called with (batch size, results) after each batch
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="itemrt-batcher", daemon=True)
        self._thread.start()

    def submit(self, images: list[ImageInput], places: Places | None = None) -> Future:
        job = Job(images)
        if places is not None:
            job.places, places.handed_over = places.n, True
        with self._lock:
            self.queued += len(images)
        self._q.put(job)
        return job.future

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new requests, wait for every admitted one to be answered, then stop."""
        self._drain(timeout_s)
        self._q.put(None)
        self._thread.join()

    # --- worker ---------------------------------------------------------------------------

    def _loop(self) -> None:
        held: Job | None = None
        while True:
            job = held or self._q.get()
            held = None
            if job is None:
                return
            batch, n = [job], len(job.images)
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while n < self.max_batch:
                try:
                    nxt = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if n + len(nxt.images) > self.max_batch:
                    held = nxt  # first in the next batch
                    break
                batch.append(nxt)
                n += len(nxt.images)
            self._run(batch)
            if stop:
                self._q.put(None)  # drain what is left, then stop

    def _run(self, batch: list[Job]) -> None:
        with self._lock:
            self.queued -= sum(len(j.images) for j in batch)
        try:
            live, outcome = self._detect(batch)
        finally:
            # Places come back before any caller hears its answer: a caller that sends its next
            # request as soon as it has one must find its place free (8 waiting clients with
            # --max-in-flight 8 got 99 429s in 2,267 requests when the answers went out first).
            self._release(sum(j.places for j in batch))
        i = 0
        for j in live:
            if isinstance(outcome, BaseException):
                j.future.set_exception(outcome)
            else:
                j.future.set_result(outcome[i : i + len(j.images)])
                i += len(j.images)

    def _detect(self, batch: list[Job]) -> tuple[list[Job], list | BaseException]:
        """The jobs whose callers still wait, and their batch's results or what it raised."""
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not live:
            return live, []
        images = [im for j in live for im in j.images]
        try:
            results = self.runtime.detect_batch(images)
        except BaseException as e:  # noqa: BLE001 - answer every caller, whatever happened
            return live, e
        if self.on_batch is not None:
            try:
                self.on_batch(len(images), results)
            except Exception:  # bookkeeping must never cost a caller its answer
                log.exception("on_batch failed; the batch's answers go out regardless")
        return live, results
