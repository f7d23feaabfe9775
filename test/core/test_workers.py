"""The node's two threads without ROS: the frame worker and the vocabulary encoder (tiny models)."""
from __future__ import annotations

import threading
import time

import pytest

from trident_ros.config import TridentConfig
from trident_ros.pipeline import TridentPipeline
from trident_ros.ros.frame_worker import FrameWorker
from trident_ros.ros.vocabulary_worker import VocabularyEncoder


def test_a_batch_of_relabel_requests_relabels_once_and_a_new_frame_replaces_them():
    relabels, frames = [], []
    worker = FrameWorker(frames.append, lambda: relabels.append(time.monotonic()), lambda error: None)
    try:
        for _ in range(5):
            worker.request_relabel()
        time.sleep(0.5)
        assert len(relabels) == 1
        worker.request_relabel()
        worker.offer('frame')  # labelled with everything in use: the relabel is not needed
        time.sleep(0.5)
        assert len(relabels) == 1 and [frame.msg for frame in frames] == ['frame']
    finally:
        assert worker.stop(1.0)


def test_the_worker_survives_a_failing_frame():
    failures = []

    def process(frame):
        raise RuntimeError('boom')
    worker = FrameWorker(process, lambda: None, failures.append)
    try:
        worker.offer('a')
        time.sleep(0.3)
        worker.offer('b')
        time.sleep(0.3)
        assert [str(error) for error in failures] == ['boom', 'boom']
    finally:
        assert worker.stop(1.0)


@pytest.fixture(scope='module')
def pipeline() -> TridentPipeline:
    return TridentPipeline(TridentConfig.from_mapping({'models.model_scale': 'tiny', 'models.random_weights': True,
                                                            'models.device': 'cpu', 'method': 'maskclip'}))


def test_a_newer_vocabulary_supersedes_one_being_encoded(pipeline):
    ready, failed, done = [], [], threading.Event()

    def on_ready(request, vocabulary):
        ready.append((request.text, vocabulary.names))
        done.set()
    encoder = VocabularyEncoder(on_ready, lambda request, error: failed.append(error), chunk_names=8)
    try:
        big = ', '.join(f'entry {i}' for i in range(400))
        encoder.submit(big, pipeline)
        assert wait_for(lambda: (encoder.pending() or None) and encoder.pending().names_done >= 8)
        assert encoder.pending().text == big and encoder.pending().names_total == 400
        encoder.submit('bed, desk', pipeline)
        assert done.wait(30)
        time.sleep(0.3)
        assert ready == [('bed, desk', ['bed', 'desk'])] and not failed
        assert encoder.pending() is None
        assert pipeline.text_cache.encoded_names < 400  # the big one stopped at a chunk boundary
    finally:
        assert encoder.stop(5.0)


def test_a_failing_encode_is_reported(pipeline):
    failed, done = [], threading.Event()

    def on_failed(request, error):
        failed.append((request.text, error))
        done.set()
    encoder = VocabularyEncoder(lambda request, vocabulary: None, on_failed)
    try:
        encoder.submit(', '.join('x' for _ in range(3)) + ', \x1b[31', pipeline)  # refused by the parser
        assert done.wait(10)
        assert 'unterminated terminal escape sequence' in str(failed[0][1])
    finally:
        assert encoder.stop(5.0)


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False
