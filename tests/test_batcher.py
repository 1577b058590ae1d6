"""The micro-batcher on its own, with the real tiny runtime: coalescing, the in-flight bound,
and every admitted caller answered, whatever the bookkeeping does."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from itemrt.errors import QueueFull
from itemrt.gateways.batcher import Batcher
from itemrt.stages.images import load_image


@pytest.fixture(scope="module")
def images(samples):
    return [load_image(p) for p in samples[:4]]


def test_concurrent_callers_coalesce_into_batches(runtime, images):
    sizes = []
    b = Batcher(runtime, max_batch=4, max_wait_s=0.5, on_batch=lambda n, results: sizes.append(n))
    try:
        futures = [b.submit([im]) for im in images]
        results = [f.result(timeout=120) for f in futures]
    finally:
        b.close(timeout_s=60)
    assert sizes == [4]  # all four waited for each other within max_wait_s
    expected = runtime.detect_batch(images)
    assert [r[0].caption_tokens for r in results] == [e.caption_tokens for e in expected]


def test_queue_depth_counts_images_waiting_for_a_batch(runtime, images):
    gate = threading.Event()

    class Slow:  # the real runtime, held until the test has looked at the queue
        def detect_batch(self, ims):
            gate.wait(60)
            return runtime.detect_batch(ims)

    b = Batcher(Slow(), max_batch=1, max_wait_s=0.0)
    try:
        first = b.submit([images[0]])
        while b.queued:  # the worker takes the first job and blocks in it
            time.sleep(0.001)
        rest = [b.submit([im]) for im in images[1:3]] + [b.submit(images[:2])]
        assert b.queued == 4
        gate.set()
        assert all(f.result(timeout=120) for f in [first, *rest])
        assert b.queued == 0
    finally:
        gate.set()
        b.close(timeout_s=60)


def test_the_in_flight_bound_refuses_at_once(runtime, images):
    b = Batcher(runtime, max_batch=2, max_in_flight=2)
    try:
        with b.admit(2), pytest.raises(QueueFull, match="limit 2"), b.admit(1):
            pass
        with b.admit(1):  # places come back when a request ends
            assert b.in_flight == 1
    finally:
        b.close(timeout_s=60)
    with pytest.raises(QueueFull, match="shutting down"), b.admit(1):
        pass


def test_failing_bookkeeping_still_answers_every_caller(runtime, images):
    def broken(n, results):
        raise RuntimeError("metrics backend down")

    b = Batcher(runtime, max_batch=2, max_wait_s=0.05, on_batch=broken)
    try:
        futures = [b.submit([im]) for im in images[:3]]
        assert all(len(f.result(timeout=120)) == 1 for f in futures)
    finally:
        b.close(timeout_s=60)


def test_close_waits_for_admitted_requests(runtime, images):
    b = Batcher(runtime, max_batch=1)
    answered = []

    def caller():
        with b.admit(1):
            answered.append(b.submit([images[0]]).result(timeout=120))

    t = threading.Thread(target=caller)
    t.start()
    while b.in_flight == 0 and t.is_alive():
        time.sleep(0.001)
    b.close(timeout_s=120)  # returns only once the admitted caller has its answer
    t.join(timeout=5)
    assert len(answered) == 1 and not t.is_alive()


def test_a_caller_that_gives_up_holds_its_places_until_its_images_leave_the_queue(runtime, images):
    gate = threading.Event()

    class Stalled:  # the real runtime, stuck until the test lets it go
        def detect_batch(self, ims):
            gate.wait(60)
            return runtime.detect_batch(ims)

    b = Batcher(Stalled(), max_batch=1, max_wait_s=0.0, max_in_flight=2)
    try:
        with b.admit(1) as places:  # the callers leave their blocks: they stopped waiting
            first = b.submit([images[0]], places)
        with b.admit(1) as places:
            second = b.submit([images[1]], places)
        assert second.cancel()  # a timed-out caller's job, still queued behind the stalled one
        assert b.in_flight == 2
        with pytest.raises(QueueFull, match="limit 2"), b.admit(1):  # their images are still held
            pass
        gate.set()
        assert first.result(timeout=120)[0].caption_tokens
        deadline = time.monotonic() + 60
        while b.in_flight:  # the worker answers the first and skips the cancelled second
            assert time.monotonic() < deadline
            time.sleep(0.001)
        with b.admit(2):
            pass
    finally:
        gate.set()
        b.close(timeout_s=60)


def test_a_caller_within_the_limit_never_gets_queue_full(runtime, images):
    """Places come back before the answers go out: 8 callers that each wait for their answer
    before sending again, with max_in_flight 8, never see QueueFull (issue 21: 99 429s in 2,267
    requests through item serve when the answers went out first)."""

    b = Batcher(runtime, max_batch=4, max_wait_s=0.002, max_in_flight=8)
    refused, answered = [], []

    def caller(i: int) -> None:
        for _ in range(12):
            try:
                with b.admit(1) as places:
                    answered.append(b.submit([images[i % len(images)]], places).result(timeout=120))
            except QueueFull as e:
                refused.append(str(e))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, as a server's event loop and clients do
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        b.close(timeout_s=60)
    assert refused == [] and len(answered) == 96
