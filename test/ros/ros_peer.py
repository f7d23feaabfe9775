"""Another ROS process for the tests where one comes and goes (what ``ros2 topic echo``/``pub`` were).

``python ros_peer.py echo TOPIC``: subscribes to ``sensor_msgs/Image`` on TOPIC (reliable, volatile)
and prints ``frame_id: <frame_id>`` for each message.

``python ros_peer.py latch TOPIC TEXT``: publishes ``std_msgs/String`` TEXT on TOPIC once a second
(reliable, transient-local, depth 1).

Either runs until it is interrupted or killed; the domain and DDS profile come from the environment.
"""
from __future__ import annotations

import contextlib
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String


def main(mode: str, topic: str, text: str = '') -> None:
    rclpy.init()
    node = rclpy.create_node(f'ros_peer_{mode}')
    if mode == 'echo':
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(Image, topic, lambda msg: print(f'frame_id: {msg.header.frame_id}', flush=True), qos)
    else:
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        publisher = node.create_publisher(String, topic, qos)
        message = String(data=text)
        publisher.publish(message)
        node.create_timer(1.0, lambda: publisher.publish(message))
    with contextlib.suppress(KeyboardInterrupt, ExternalShutdownException):
        rclpy.spin(node)


if __name__ == '__main__':
    main(*sys.argv[1:])
