"""The node's parameter callbacks as Humble has them (one on-set callback), run for real on this rclpy.

The node runs in this process (its own context and domain) with ``pre_post_set_callbacks`` False: the
Humble branch of :func:`trident_ros.ros.compat.add_parameter_callbacks`, where the node applies a change
before rclpy stores it. A second node with the default (pre-set and post-set callbacks) runs the same
checks, over real DDS from a separate client: both must behave alike, except that only the pre-set
callback turns an integer for a float parameter into a float.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import rclpy
from lifecycle_msgs.msg import Transition
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions

# ros_helpers first: it checks the ROS 2 environment with a clear message
from ros_helpers import BEST_EFFORT, LATCHED, RELIABLE, TestNode, fresh_domain_id, wait_until
from sensor_msgs.msg import Image
from std_msgs.msg import String
from test_node import NODE, OUTPUT_TYPES, ROOM, image_msg, send_until_outputs
from trident_ros.msg import VocabularyInfo
from vision_msgs.msg import LabelInfo

from trident_ros.ros.compat import PRE_POST_SET_CALLBACKS, SubscriptionEventCallbacks
from trident_ros.ros.node import TridentNode

SMALL = ROOM[::4, ::4]  # 160x120: quick frames


class InProcessNode:
    """A :class:`TridentNode` on ``domain_id``, spun by a 4-thread executor in a background thread."""

    def __init__(self, domain_id: int, pre_post_set_callbacks: bool) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
        self.node = TridentNode(pre_post_set_callbacks, context=self.context, parameter_overrides=[
            Parameter('models.random_weights', value=True), Parameter('models.model_scale', value='tiny')])
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def close(self) -> None:
        assert self.node.stop_worker(5.0)
        self.executor.shutdown(timeout_sec=2.0)
        self.node.destroy_node()
        self.context.try_shutdown()


@pytest.fixture(scope='module', params=[False, True], ids=['humble_on_set_only', 'pre_post_set'])
def setup(request) -> Iterator[tuple[TestNode, dict, bool]]:
    """(client, its subscriptions by name, whether the node uses pre/post-set callbacks)."""
    domain = fresh_domain_id()
    client = TestNode(domain)
    outputs = {name: client.subscribe(msg_type, f'{NODE}/{name}') for name, msg_type in OUTPUT_TYPES.items()}
    outputs['vocabulary_info'] = client.subscribe(VocabularyInfo, f'{NODE}/vocabulary_info', LATCHED)
    outputs['label_info'] = client.subscribe(LabelInfo, f'{NODE}/label_info', LATCHED)
    trident = InProcessNode(domain, request.param)
    try:
        assert client.change_state(NODE, Transition.TRANSITION_CONFIGURE)
        assert client.change_state(NODE, Transition.TRANSITION_ACTIVATE)
        yield client, outputs, request.param
    finally:
        trident.close()
        client.close()


def test_this_rclpy_has_pre_and_post_set_callbacks_and_the_event_callbacks_class():
    """Kilted and Jazzy: the default is the pre/post path, so the Humble branch runs only when asked for."""
    assert PRE_POST_SET_CALLBACKS
    assert SubscriptionEventCallbacks.__module__ in ('rclpy.event_handler', 'rclpy.qos_event')


def test_an_int_for_a_float_parameter_is_coerced_only_by_a_pre_set_callback(setup):
    client, _, pre_post = setup
    result = client.set_parameters(NODE, {'labelling.logit_scale': 41})[0]
    if pre_post:
        assert result.successful
        assert client.get_parameters(NODE, ['labelling.logit_scale']) == {'labelling.logit_scale': 41.0}
    else:  # as on Humble: rclpy refuses the type before any callback could coerce it
        assert not result.successful and 'Wrong parameter type' in result.reason, result
        assert client.get_parameters(NODE, ['labelling.logit_scale']) == {'labelling.logit_scale': 40.0}
    assert client.set_parameters(NODE, {'labelling.logit_scale': 40.0})[0].successful


def test_vocabulary_and_a_labelling_parameter_apply_at_once(setup):
    """A vocabulary from the topic relabels the last frame; ``prob_thd`` reaches LabelInfo at once."""
    client, outputs, _ = setup
    publisher = client.publisher(String, f'{NODE}/vocabulary', RELIABLE)
    assert wait_until(lambda: publisher.get_subscription_count() > 0, 10)
    publisher.publish(String(data='floor, wall'))
    assert outputs['vocabulary_info'].wait_for(lambda m: list(m.classes) == ['floor', 'wall'], 30)
    camera = client.publisher(Image, '/image', BEST_EFFORT)
    msg = image_msg(SMALL)
    send_until_outputs(camera, msg, outputs, ('masks',))
    since = time.monotonic()
    publisher.publish(String(data='door, sofa; couch, lamp'))
    relabelled = outputs['masks'].wait_for(lambda m: m.header.stamp.sec == msg.header.stamp.sec
                                           and list(m.vocabulary) == ['door', 'sofa; couch', 'lamp'], 30, after=since)
    assert relabelled is not None
    assert client.get_parameters(NODE, ['vocabulary']) == {'vocabulary': 'door, sofa; couch, lamp'}
    since = time.monotonic()
    assert client.set_parameters(NODE, {'labelling.prob_thd': 0.35})[0].successful
    assert outputs['label_info'].wait_for(lambda m: abs(m.threshold - 0.35) < 1e-6, 10, after=since)
    assert client.set_parameters(NODE, {'labelling.prob_thd': 0.2})[0].successful
    client.node.destroy_publisher(camera)
    client.node.destroy_publisher(publisher)


def test_image_qos_and_use_depth_remake_the_subscriptions_from_the_new_values(setup):
    client, outputs, _ = setup

    def trident_subscribes(topic: str, reliability: ReliabilityPolicy) -> bool:
        return any(info.node_name == 'trident' and info.qos_profile.reliability == reliability
                   for info in client.node.get_subscriptions_info_by_topic(topic))

    assert client.set_parameters(NODE, {'image_qos': 'reliable'})[0].successful
    assert wait_until(lambda: trident_subscribes('/image', ReliabilityPolicy.RELIABLE), 10)
    camera = client.publisher(Image, '/image', RELIABLE)
    send_until_outputs(camera, image_msg(SMALL), outputs, ('labels',))
    assert client.set_parameters(NODE, {'depth.use': True})[0].successful
    assert wait_until(lambda: trident_subscribes('/depth', ReliabilityPolicy.RELIABLE), 10)
    assert client.set_parameters(NODE, {'image_qos': 'sensor_data', 'depth.use': False})[0].successful
    assert wait_until(lambda: trident_subscribes('/image', ReliabilityPolicy.BEST_EFFORT)
                      and not client.node.get_subscriptions_info_by_topic('/depth'), 10)
    client.node.destroy_publisher(camera)
