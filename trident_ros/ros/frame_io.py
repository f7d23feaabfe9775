"""The trident node's per-frame I/O: the camera subscription, the outputs and their messages.

QoS is overridable with the standard ``qos_overrides.<topic>...`` parameters (read at creation):
``qos_overrides./<image topic>.subscription.{history,depth}`` for the camera (its reliability is
the ``image_qos`` parameter, which can change at runtime) and
``qos_overrides./<node>/<output>.publisher.{history,depth,reliability}`` for each output.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Any

import numpy as np
from rclpy.callback_groups import CallbackGroup
from rclpy.lifecycle import LifecycleNode
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSPolicyKind, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.subscription import Subscription
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from trident_ros.labelling import Segmentation
from trident_ros.msg import ClassMaskArray
from trident_ros.pipeline import ImageFeatures
from trident_ros.ros import conversions
from trident_ros.ros.depth_io import Frame3D

IMAGE_QOS_PROFILES = {
    'sensor_data': QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                              durability=DurabilityPolicy.VOLATILE),
    'reliable': QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.VOLATILE),
}
IMAGE_QOS_OVERRIDES = QoSOverridingOptions(policy_kinds=(QoSPolicyKind.HISTORY, QoSPolicyKind.DEPTH))
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE)
OUTPUT_QOS_OVERRIDES = QoSOverridingOptions.with_default_policies()
OUTPUT_TYPES = {'segmentation': Image, 'labels': Image, 'confidence': Image, 'masks': ClassMaskArray}


@dataclass
class LastFrame:
    """What a vocabulary change needs to relabel the last frame without its image encoders."""

    header: Header
    rgb: np.ndarray  # (H, W, 3) uint8
    features: ImageFeatures


def create_image_subscription(node: LifecycleNode, transport: str, image_qos: str,
                              callback: Callable[[Any], None], group: CallbackGroup) -> Subscription:
    """Subscribe ``image`` (raw) or ``image/compressed`` with the ``image_qos`` profile (and overrides)."""
    compressed = transport == 'compressed'
    # rclpy applies the overrides to the profile it is given: each subscription gets its own copy
    return node.create_subscription(CompressedImage if compressed else Image,
                                    'image/compressed' if compressed else 'image', callback,
                                    copy.copy(IMAGE_QOS_PROFILES[image_qos]), callback_group=group,
                                    qos_overriding_options=IMAGE_QOS_OVERRIDES)


def create_outputs(node: LifecycleNode) -> dict[str, Publisher]:
    """One publisher per output, ``~/<output>`` (with overrides)."""
    return {name: node.create_publisher(msg_type, f'~/{name}', copy.copy(OUTPUT_QOS),
                                        qos_overriding_options=OUTPUT_QOS_OVERRIDES)
            for name, msg_type in OUTPUT_TYPES.items()}


def segmentation_messages(seg: Segmentation, last: LastFrame, num_classes: int, wanted: Set[str],
                          frame_3d: Frame3D | None = None) -> dict[str, Any]:
    """The messages of the ``wanted`` outputs for one segmentation of ``last``, with its header.

    Args:
        seg: labels ``(H, W)``, confidence ``(H, W)`` and masks of the frame.
        last: the frame (header, ``(H, W, 3)`` RGB).
        num_classes: classes of the vocabulary (mono16 labels past 255).
        wanted: names of :data:`OUTPUT_TYPES` to build.
        frame_3d: the frame's 3D (``use_depth`` with a matching depth): the masks get position, size
            and num_points per class; None: 2D masks.

    Returns:
        Output name -> message.
    """
    header = last.header
    messages: dict[str, Any] = {}
    if 'segmentation' in wanted:
        messages['segmentation'] = conversions.array_to_image(seg.overlay(last.rgb), 'rgb8', header)
    if 'labels' in wanted:
        messages['labels'] = conversions.labels_to_image(seg.labels, num_classes, header)
    if 'confidence' in wanted:
        messages['confidence'] = conversions.confidence_to_image(seg.confidence, header)
    if 'masks' in wanted:
        messages['masks'] = conversions.class_masks_to_msg(seg.masks, seg.vocabulary, header,
                                                           frame_3d.classes if frame_3d is not None else None,
                                                           frame_3d.frame_id if frame_3d is not None else '')
    return messages
