"""The node never blocks on a frame: services and the vocabulary topic answer while a frame is slow.

One node process (tiny random-weight models, own ROS_DOMAIN_ID), started with ``TRIDENT_TEST_SLOW_FRAME_ID``
(a documented test hook, docs/reliability.md): a frame with that ``frame_id`` holds the frame worker for
``SLOW_FRAME_S`` (>= 2 s) in the middle of its image side, as a slow encoder would. The last test stops the node
with SIGTERM in the middle of such a frame.
"""
from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

# ros_helpers first: it checks the ROS 2 environment with a clear message
from lifecycle_msgs.msg import Transition
from ros_helpers import RELIABLE, RosProcess, executable, running
from sensor_msgs.msg import Image
from std_msgs.msg import String
from test_node import NODE, ROOM, VOCABULARY, image_msg, same_stamp, send_until_outputs, set_vocabulary_by_topic

from trident_ros.ros.frame_io import SLOW_FRAME_ID_ENV, SLOW_FRAME_S

pytest_plugins = ('node_fixtures',)  # domain, env, client, outputs, cameras (this module's own), active (on trident)
SLOW = 'slow_camera'
HELD = 'frame held'  # the hook's log line: the slow frame is in the worker
ANSWER_S = 0.2
SMALL = ROOM[::4, ::4]


@pytest.fixture(scope='module')
def trident(env, client, outputs, cameras, tmp_path_factory):
    """The node, unconfigured, with the slow-frame hook armed."""
    process = RosProcess([executable('trident_node'), '--ros-args', '-p', 'models.random_weights:=true',
                          '-p', 'models.model_scale:=tiny', '-p', f'vocabulary:={VOCABULARY}'],
                         {**env, SLOW_FRAME_ID_ENV: SLOW}, tmp_path_factory.mktemp('node') / 'node.log')
    with running(client, process, NODE):
        yield process


def during_a_slow_frame(process: RosProcess, camera, outputs, call: Callable[[], Any]) -> tuple[Any, float, Any]:
    """Send a slow frame, run ``call`` once the worker holds it; (call's result, seconds it took, the frame).

    Fails unless the frame's outputs came after ``call`` returned (so it really ran during the frame).
    """
    held = process.output().count(HELD)
    msg = image_msg(SMALL, frame_id=SLOW)
    camera.publish(msg)
    assert wait_for_count(process, HELD, held + 1, 10), process.output()[-3000:]
    start = time.monotonic()
    result = call()
    seconds = time.monotonic() - start
    print(f'\nanswered in {seconds * 1000:.0f} ms during a {SLOW_FRAME_S} s frame')
    assert not any(same_stamp(m, msg.header) for m in outputs['labels'].snapshot()), 'the frame was not slow'
    assert outputs['labels'].wait_for(lambda m: same_stamp(m, msg.header), SLOW_FRAME_S + 20) is not None
    return result, seconds, msg


def wait_for_count(process: RosProcess, text: str, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process.output().count(text) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_set_parameters_answers_during_a_slow_frame(active, client, outputs, cameras):
    send_until_outputs(cameras['reliable'], image_msg(SMALL), outputs, ('labels',))
    client.get_parameters(NODE, ['labelling.prob_thd'])  # the clients exist before the clock runs
    client.set_parameters(NODE, {'labelling.prob_thd': 0.2})
    try:
        results, seconds, _ = during_a_slow_frame(active, cameras['reliable'], outputs,
                                                  lambda: client.set_parameters(NODE, {'labelling.prob_thd': 0.3}))
        assert results[0].successful and seconds < ANSWER_S, seconds
        assert client.get_parameters(NODE, ['labelling.prob_thd']) == {'labelling.prob_thd': 0.3}
    finally:
        assert client.set_parameters(NODE, {'labelling.prob_thd': 0.2})[0].successful


def test_get_state_answers_during_a_slow_frame(active, client, outputs, cameras):
    client.lifecycle_state(NODE)
    state, seconds, _ = during_a_slow_frame(active, cameras['reliable'], outputs, lambda: client.lifecycle_state(NODE))
    assert state == 'active' and seconds < ANSWER_S, seconds


def test_a_vocabulary_is_taken_during_a_slow_frame_and_the_relabel_follows_the_frame(active, client, outputs,
                                                                                     cameras):
    publisher = client.publisher(String, f'{NODE}/vocabulary', RELIABLE)
    names = ['kettle', 'lampshade', 'windowsill']  # not cached: the text encoder runs

    def send_and_wait_for_info() -> Any:
        publisher.publish(String(data=', '.join(names)))
        return outputs['vocabulary_info'].wait_for(lambda m: list(m.classes) == names, 10, after=time.monotonic())

    try:
        assert wait_for_subscription(publisher)
        info, seconds, msg = during_a_slow_frame(active, cameras['reliable'], outputs, send_and_wait_for_info)
        assert info is not None and seconds < ANSWER_S, seconds
        # the frame went out with the vocabulary it started with, then the relabel with the new one
        masks = outputs['masks'].wait_for(lambda m: same_stamp(m, msg.header) and list(m.vocabulary) == names, 20)
        assert masks is not None, active.output()[-3000:]
        first = next(m for m in outputs['masks'].snapshot() if same_stamp(m, msg.header))
        assert list(first.vocabulary) != names
    finally:
        client.node.destroy_publisher(publisher)
        set_vocabulary_by_topic(client, outputs, VOCABULARY, [n.strip() for n in VOCABULARY.split(',')])


def wait_for_subscription(publisher, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while publisher.get_subscription_count() == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize('run', range(3))
def test_sigterm_while_a_frame_ends_ends_it_quietly(client, env, tmp_path, run):
    """SIGTERM 0.5 s before a frame ends: it ends within the shutdown wait, without an ERROR.

    Without care, that frame publishes on the shut-down context ("frame skipped: RCLError ... publisher's
    context is invalid") and its error fails to reach /rosout.
    """
    namespace = f'/quiet{run}'
    process = RosProcess([executable('trident_node'), '--ros-args', '-r', f'__ns:={namespace}',
                          '-p', 'models.random_weights:=true', '-p', 'models.model_scale:=tiny',
                          '-p', f'vocabulary:={VOCABULARY}'],
                         {**env, SLOW_FRAME_ID_ENV: SLOW}, tmp_path / 'node.log')
    try:
        labels = client.subscribe(Image, f'{namespace}/trident/labels')
        camera = client.publisher(Image, f'{namespace}/image', RELIABLE)
        client.wait_for_node(f'{namespace}/trident', process)
        for transition_id in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            assert client.change_state(f'{namespace}/trident', transition_id), process.output()
        send_until_outputs(camera, image_msg(SMALL), {'labels': labels}, ('labels',))
        camera.publish(image_msg(SMALL, frame_id=SLOW))
        assert wait_for_count(process, HELD, 1, 10), process.output()[-3000:]
        time.sleep(SLOW_FRAME_S - 0.5)
        before = len(process.output())
        process.popen.send_signal(signal.SIGTERM)  # the node itself, not its process group
        assert process.popen.wait(10) == 0
    finally:
        process.stop()
    tail = process.output()[before:]
    assert 'ERROR' not in tail and 'Traceback' not in tail and 'rosout' not in tail, tail
