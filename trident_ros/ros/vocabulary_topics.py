"""The trident node's vocabulary topics: ``~/vocabulary`` in, ``~/vocabulary_info`` and ``~/label_info`` out.

They exist from configure to cleanup, so a vocabulary sent while the node is inactive is taken.
``~/vocabulary`` has a volatile subscription always (it matches ``ros2 topic pub`` defaults and
every other publisher) and, while a transient-local (latched) publisher exists, also a
transient-local one, which receives what that publisher sent before it matched. That one is not
kept all the time because it is incompatible with volatile publishers, which then print warnings.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from rclpy.lifecycle import LifecycleNode
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header, String

from trident_ros.msg import VocabularyInfo
from trident_ros.ros import conversions
from trident_ros.ros.compat import SubscriptionEventCallbacks
from trident_ros.visualization import class_colors
from trident_ros.vocabulary import Vocabulary

LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
VOCABULARY_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
LATCH_WATCH_S = 1.0  # how often the latched publishers of ~/vocabulary are looked for


class VocabularyTopics:
    """The vocabulary subscriptions and the latched vocabulary publishers of ``node``.

    Args:
        node: the node that owns them.
        on_text: called with each ``std_msgs/String`` received on ``~/vocabulary``.
    """

    def __init__(self, node: LifecycleNode, on_text: Callable[[String], None]) -> None:
        self._node = node
        self._on_text = on_text
        self._info = node.create_publisher(VocabularyInfo, '~/vocabulary_info', LATCHED_QOS)
        self._label_info = (node.create_publisher(conversions.LabelInfo, '~/label_info', LATCHED_QOS)
                            if conversions.LabelInfo is not None else None)
        self._sub = node.create_subscription(String, '~/vocabulary', on_text, VOCABULARY_QOS)
        self._latched_sub = None
        self._lock = threading.Lock()  # the watch timer vs. destroy
        self._destroyed = False
        self._watch()
        self._timer = node.create_timer(LATCH_WATCH_S, self._watch)

    def publish(self, vocabulary: Vocabulary, prob_thd: float) -> None:
        """Announce ``vocabulary`` (classes, ids, colours; ``label_info`` with ``prob_thd``)."""
        header = Header(stamp=self._node.get_clock().now().to_msg())
        self._info.publish(conversions.vocabulary_info(vocabulary.names, class_colors(vocabulary.num_classes)[1:],
                                                       header))
        if self._label_info is not None:
            self._label_info.publish(conversions.label_info(vocabulary.first_names, prob_thd, header))

    def destroy(self) -> None:
        """Remove the subscriptions, the publishers and the timer."""
        node = self._node
        with self._lock:
            self._destroyed = True
        node.destroy_timer(self._timer)
        for sub in (self._sub, self._latched_sub):
            if sub is not None:
                node.destroy_subscription(sub)
        for pub in (self._info, self._label_info):
            if pub is not None:
                node.destroy_publisher(pub)

    def _watch(self) -> None:
        """Keep a transient-local subscription exactly while a latched publisher exists."""
        with self._lock:
            if self._destroyed:
                return
            latched = any(info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
                          for info in self._node.get_publishers_info_by_topic(self._sub.topic_name))
            if latched and self._latched_sub is None:
                self._latched_sub = self._node.create_subscription(
                    String, '~/vocabulary', self._on_text, LATCHED_QOS,
                    event_callbacks=SubscriptionEventCallbacks(incompatible_qos=lambda event: None))
            elif not latched and self._latched_sub is not None:
                self._node.destroy_subscription(self._latched_sub)
                self._latched_sub = None
