"""Node state shared by threads: counters and warnings from many threads, vocabulary results handed back.

In-process (no DDS traffic): the races the node had (issue 21, point 3) are driven directly.
"""
from __future__ import annotations

import sys
import threading
from types import SimpleNamespace

# ros_helpers first: it checks the ROS 2 environment with a clear message
import ros_helpers
from diagnostic_msgs.msg import DiagnosticStatus

from trident_ros.ros.health import Counters, NodeHealth
from trident_ros.ros.vocabulary_worker import VocabularyRequest

THREADS, TIMES = 8, 5000


def hammer(work) -> None:
    """Run ``work(thread_index)`` on THREADS threads at once, switching threads as often as Python can."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)


def test_counters_from_many_threads_lose_no_count():
    counters = Counters()

    def work(_: int) -> None:
        for _ in range(TIMES):
            counters.add('received')
            counters.add('dropped', 2)
    hammer(work)
    values = counters.values()
    assert values['received'] == THREADS * TIMES and values['dropped'] == 2 * THREADS * TIMES


def test_warnings_of_many_kinds_from_many_threads_are_throttled_without_a_race():
    logged: list[str] = []
    health = NodeHealth(SimpleNamespace(warning=logged.append, error=lambda *a, **k: None))
    failures: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for i in range(TIMES // 10):
                health.warn(f'kind{index}:{i}', f'warning {index} {i}')  # past MAX_WARNING_KINDS: forgets old kinds
                health.status('node', 'active', {}, None)
        except BaseException as error:  # e.g. "dictionary changed size during iteration"
            failures.append(error)
    hammer(work)
    assert not failures, failures[:3]
    assert len(logged) == THREADS * (TIMES // 10)  # every kind is new: each is logged once
    assert health.status('node', 'active', {}, None).level == DiagnosticStatus.WARN


def test_vocabulary_results_are_taken_by_the_node_and_those_of_dropped_models_are_discarded():
    """The vocabulary thread only hands results back; the node takes them in its own callback, where
    "models dropped since?" and adopting the vocabulary are one step.
    """
    from rclpy.lifecycle import TransitionCallbackReturn

    with ros_helpers.in_process_node({'vocabulary': 'floor, wall'}) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        old_pipeline = node._now.pipeline
        door = old_pipeline.encode_vocabulary('door')
        node._hand_back(VocabularyRequest('door', old_pipeline), door)  # what the thread does, nothing more
        assert node._now.vocabulary_text == 'floor, wall'  # not taken until the node takes it
        node._take_vocabulary_results()
        assert node._now.vocabulary is door
        chair = old_pipeline.encode_vocabulary('chair')
        node._hand_back(VocabularyRequest('chair', old_pipeline), chair)
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS  # models dropped before it is taken
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        node._take_vocabulary_results()
        assert node._now.vocabulary is not chair and node._now.vocabulary_text == 'floor, wall'


def test_a_failed_vocabulary_resets_the_parameter_only_while_it_still_names_the_failed_text():
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    with ros_helpers.in_process_node({'vocabulary': 'floor, wall'}) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        pipeline = node._now.pipeline
        assert node.set_parameters([Parameter('vocabulary', value='sofa')])[0].successful
        assert node.set_parameters([Parameter('vocabulary', value='lamp')])[0].successful  # newer, meanwhile
        node._hand_back(VocabularyRequest('sofa', pipeline), MemoryError('text encoder'))
        node._take_vocabulary_results()
        assert node.get_parameter('vocabulary').value == 'lamp'  # the newer text stays
        node._hand_back(VocabularyRequest('lamp', pipeline), MemoryError('text encoder'))
        node._take_vocabulary_results()
        assert node.get_parameter('vocabulary').value == 'floor, wall'  # back to the text in use
        counts = {kv.key: kv.value for kv in node.diagnostic_status().values}
        assert counts['vocabularies_refused'] == '2'
