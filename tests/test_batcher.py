"""The dynamic batcher (imgcls/serving/batcher.py) on its own: what arrives together runs together, within
the batch size; a lone image waits at most the wait; a failing model fails its requests, not the thread."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from imgcls.serving.batcher import Batcher, Full  # (torch only: no web library needed)


class Recording:
    """A real function of the batch (each image's mean), remembering the size of every batch it ran."""

    def __init__(self, fail: bool = False):
        self.sizes: list[int] = []
        self.fail = fail

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if self.fail:
            raise RuntimeError("the device failed")
        return x.float().mean((1, 2, 3))


def images(n: int) -> list[torch.Tensor]:
    return [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(n)]


def test_images_that_arrive_together_run_together_within_the_batch_size():
    model = Recording()
    b = Batcher(model, max_batch=4, max_wait_s=0.5, max_queue=100)
    try:
        futures = b.submit(images(6)) + b.submit(images(3))
        assert [f.result(10).item() for f in futures] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
        assert model.sizes == [4, 4, 1]
    finally:
        b.stop()


def test_a_lone_image_waits_at_most_the_wait():
    model = Recording()
    b = Batcher(model, max_batch=8, max_wait_s=0.2, max_queue=100)
    try:
        start = time.monotonic()
        [f] = b.submit(images(1))
        f.result(10)
        assert 0.15 < time.monotonic() - start < 2 and model.sizes == [1]
    finally:
        b.stop()


def test_a_failing_model_fails_its_requests_and_the_thread_serves_on():
    model = Recording(fail=True)
    b = Batcher(model, max_batch=2, max_wait_s=0.01, max_queue=100)
    try:
        with pytest.raises(RuntimeError, match="device failed"):
            asyncio.run(b.predict(images(2)))
        model.fail = False
        assert len(asyncio.run(b.predict(images(3)))) == 3
    finally:
        b.stop()


def test_a_failing_observer_of_batches_neither_loses_the_answers_nor_stops_the_thread():
    """What is told each batch's size and time (GET /metrics' files: a full disk) must not cost the answers."""
    def observe(size: int, seconds: float) -> None:
        raise OSError("no space left on device")

    b = Batcher(Recording(), max_batch=2, max_wait_s=0.01, max_queue=100)
    b.observe = observe
    try:
        assert [f.result(10).item() for f in b.submit(images(2))] == [0, 1]
        assert [f.result(10).item() for f in b.submit(images(1))] == [0]
    finally:
        b.stop()


def test_a_full_queue_turns_requests_away():
    b = Batcher(Recording(), max_batch=8, max_wait_s=10, max_queue=2)  # (the two wait for a batch to fill)
    try:
        b.submit(images(2))
        with pytest.raises(Full, match="--max-queue"):
            b.submit(images(1))
    finally:
        b.stop()


def test_stopping_finishes_what_is_queued():
    model = Recording()
    b = Batcher(model, max_batch=2, max_wait_s=10, max_queue=100)
    futures = b.submit(images(5))
    b.stop()
    assert all(f.done() and not f.cancelled() for f in futures) and sum(model.sizes) == 5


def test_other_work_on_the_model_takes_its_turn_and_does_not_starve_the_images():
    """Explanations run on the model thread too: in the order they arrived with the images, so a stream
    of them cannot hold predictions back until they time out."""
    import threading

    ran: list[str] = []
    model = Recording()
    b = Batcher(lambda x: (ran.append("images"), model(x))[1], max_batch=4, max_wait_s=0.01, max_queue=100)
    try:
        release = threading.Event()
        first = b.call(lambda: (release.wait(10), ran.append("job 1")))
        time.sleep(0.1)  # (the model thread is in the first job)
        futures = b.submit(images(2))
        later = b.call(lambda: ran.append("job 2"))
        release.set()
        first.result(10), later.result(10), [f.result(10) for f in futures]
        assert ran == ["job 1", "images", "job 2"]
    finally:
        b.stop()


def test_a_batch_waits_for_the_images_being_decoded():
    """Under load the next requests are being decoded when a batch is taken: run alone they would make a
    batch nearly as costly as a full one."""
    model = Recording()
    b = Batcher(model, max_batch=4, max_wait_s=0, max_queue=100)
    b.join_wait_s = 10
    try:
        with b.expecting(1):  # a second request, still decoding
            with b.expecting(1):
                first = b.submit(images(1))
            time.sleep(0.2)
            assert not first[0].done()
            second = b.submit(images(1))
        assert [f.result(10).item() for f in first + second] == [0, 0] and model.sizes == [2]
        lone = time.monotonic()
        b.submit(images(1))[0].result(10)  # nothing else being decoded: no wait
        assert time.monotonic() - lone < 5 and model.sizes == [2, 1]
    finally:
        b.stop()


def test_a_batch_waits_for_decoding_images_at_most_join_wait():
    model = Recording()
    b = Batcher(model, max_batch=4, max_wait_s=0, max_queue=100)
    b.join_wait_s = 0.3
    try:
        with b.expecting(1):  # (a huge upload, slow to decode)
            start = time.monotonic()
            b.submit(images(1))[0].result(10)
            assert 0.25 < time.monotonic() - start < 5 and model.sizes == [1]
    finally:
        b.stop()


def held_batch(exclusive: bool):
    """A batcher whose model is held inside its first batch until released; and the release."""
    import threading

    release = threading.Event()
    inside = threading.Event()
    model = Recording()
    b = Batcher(lambda x: (inside.set(), release.wait(10), model(x))[2], max_batch=4, max_wait_s=0, max_queue=100)
    b.exclusive = exclusive
    first = b.submit(images(1))
    assert inside.wait(10)
    return b, release, first


def decoding_thread(b: Batcher):
    """A thread that waits as a decoding thread does before it decodes; set once it may decode."""
    import threading

    passed = threading.Event()
    threading.Thread(target=lambda: (b.wait_between_batches(), passed.set()), daemon=True).start()
    return passed


def test_decoding_waits_while_a_batch_runs_when_the_model_has_every_core():
    b, release, first = held_batch(exclusive=True)
    try:
        passed = decoding_thread(b)
        assert not passed.wait(0.3)  # (the batch still runs)
        release.set()
        assert passed.wait(10) and first[0].result(10).item() == 0
        b.wait_between_batches()  # between batches: at once
    finally:
        release.set()
        b.stop()


def test_decoding_does_not_wait_for_a_batch_when_the_model_leaves_it_cores():
    b, release, _ = held_batch(exclusive=False)
    try:
        start = time.monotonic()
        b.wait_between_batches()
        assert time.monotonic() - start < 5
    finally:
        release.set()
        b.stop()


def test_decoding_goes_on_after_a_batch_that_failed():
    b = Batcher(Recording(fail=True), max_batch=4, max_wait_s=0, max_queue=100)
    b.exclusive = True
    try:
        with pytest.raises(RuntimeError):
            b.submit(images(1))[0].result(10)
        assert b.between.wait(5)
    finally:
        b.stop()


def test_decoding_waits_while_an_explanation_runs_when_the_model_has_every_core():
    import threading

    b = Batcher(Recording(), max_batch=4, max_wait_s=0, max_queue=100)
    b.exclusive = True
    release, inside = threading.Event(), threading.Event()
    try:
        job = b.call(lambda: (inside.set(), release.wait(10)))  # (Grad-CAM: the model on every core, as a batch)
        assert inside.wait(10)
        passed = decoding_thread(b)
        assert not passed.wait(0.3)
        release.set()
        assert passed.wait(10) and job.result(10)
    finally:
        release.set()
        b.stop()
