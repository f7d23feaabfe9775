"""The trident node's frames: the camera subscription, the outputs and their messages, the frame worker's jobs.

QoS is overridable with the standard ``qos_overrides.<topic>...`` parameters (read at creation):
``qos_overrides./<image topic>.subscription.{history,depth}`` for the camera (its reliability is
the ``image_qos`` parameter, which can change at runtime) and
``qos_overrides./<node>/<output>.publisher.{history,depth,reliability}`` for each output.
"""
from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rclpy.callback_groups import CallbackGroup, MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSPolicyKind, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.subscription import Subscription
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from trident_ros.config import TridentConfig
from trident_ros.image_decoding import ImageConversionError, compressed_to_rgb
from trident_ros.labelling import Segmentation
from trident_ros.msg import ClassMaskArray
from trident_ros.pipeline import ImageFeatures, TridentPipeline
from trident_ros.ros import conversions
from trident_ros.ros.depth_io import DepthCounts, DepthIO, Frame3D
from trident_ros.ros.frame_worker import Frame, FrameWorker
from trident_ros.ros.health import NodeHealth
from trident_ros.ros.parameters import DEPTH_FIELDS
from trident_ros.vocabulary import Vocabulary

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
FAULT_FRAME_ID_ENV = 'TRIDENT_TEST_FAULT_FRAME_ID'
"""Test hook, read once at start (docs/reliability.md): frames whose ``header.frame_id`` equals this
variable's value fail inside the worker as CUDA running out of memory would. Unset (the default) it
does nothing; it cannot be set over ROS."""
SLOW_FRAME_ID_ENV = 'TRIDENT_TEST_SLOW_FRAME_ID'
"""Test hook, read once at start (docs/reliability.md): frames whose ``header.frame_id`` equals this
variable's value hold the worker SLOW_FRAME_S longer after their image side, as a slow encoder would
(logged: ``frame held``). Unset (the default) it does nothing; it cannot be set over ROS."""
SLOW_FRAME_S = 2.5


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


@dataclass(frozen=True)
class Snapshot:
    """What the node runs with; never changed in place: the node's control callbacks swap in a new one.

    The frame worker reads it once per job and runs the whole job on it, without a lock, while the
    control callbacks go on (a change made meanwhile applies from the next job: a relabel follows).

    Attributes:
        values: every parameter of the node as applied.
        pipeline: the loaded models (None: unconfigured).
        config: the configuration frames run with (fields that need no reload change at once).
        vocabulary: the vocabulary in use (None: none yet) and ``vocabulary_text``, its text.
        active: frames are processed.
    """

    values: Mapping[str, Any]
    pipeline: TridentPipeline | None = None
    config: TridentConfig | None = None
    vocabulary: Vocabulary | None = None
    vocabulary_text: str = ''
    active: bool = False


class FramePath:
    """The node's frames: camera, outputs and depth I/O of an activation, and the frame worker's jobs.

    The worker (:class:`.FrameWorker`, one thread) labels the newest frame or relabels the last one, each
    job on the snapshot it starts with (no lock is held while an encoder runs). The I/O is made and removed
    by the node's control callbacks under ``_io_lock``, which the worker holds only to publish.

    Args:
        node: the node.
        snapshot: returns the node's current :class:`Snapshot`.
        health: the node's counters, warnings and errors.
    """

    def __init__(self, node: LifecycleNode, snapshot: Callable[[], Snapshot], health: NodeHealth) -> None:
        self._node, self._snapshot, self._health = node, snapshot, health
        self._fault_frame_id = os.environ.get(FAULT_FRAME_ID_ENV, '')
        self._slow_frame_id = os.environ.get(SLOW_FRAME_ID_ENV, '')
        self._io_lock = threading.RLock()  # publishers/subscriptions vs. the worker publishing (held for ms only)
        self._outputs: dict[str, Publisher] = {}
        self._image_sub: Subscription | None = None
        self._image_group = MutuallyExclusiveCallbackGroup()
        self.depth: DepthIO | None = None  # with depth.use, while active
        self.depth_counts = DepthCounts()
        self._depth_group = MutuallyExclusiveCallbackGroup()
        self._last: tuple[LastFrame, TridentPipeline] | None = None  # the worker's: its last frame, its models
        self.worker = FrameWorker(self._process, self._relabel_last, self._failed)

    # ------------------------------------------------------------------ I/O (control callbacks)
    def open(self) -> None:
        """Activate: the outputs, the camera subscription and (``depth.use``) the depth I/O."""
        with self._io_lock:
            self._outputs = create_outputs(self._node)
            self._create_image_input()
            self._create_depth_io()

    def parameters_changed(self, changed: Set[str]) -> None:
        """Make the camera subscription or the depth I/O again where ``changed`` parameters need it."""
        with self._io_lock:
            if self._image_sub is not None and changed & {'image_transport', 'image_qos'}:
                self._create_image_input()
            if self._image_sub is not None and changed & (DEPTH_FIELDS | {'image_qos'}):
                self._create_depth_io()

    def close(self) -> None:
        """Deactivate: remove every subscription and publisher; the pending frame and relabel are forgotten."""
        with self._io_lock:
            if self._image_sub is not None:
                self._node.destroy_subscription(self._image_sub)
                self._image_sub = None
            if self.depth is not None:
                self.depth.destroy()
                self.depth = None
            for pub in self._outputs.values():
                self._node.destroy_publisher(pub)
            self._outputs = {}
        self.worker.clear()

    def forget_last(self) -> None:
        """Let go of the last frame (its models are being dropped)."""
        self._last = None

    def _create_image_input(self) -> None:
        values = self._snapshot().values
        if self._image_sub is not None:
            self._node.destroy_subscription(self._image_sub)
        self._image_sub = create_image_subscription(self._node, values['image_transport'], values['image_qos'],
                                                    self.on_image, self._image_group)
        self._node.get_logger().info(f'subscribed to {self._image_sub.topic_name} ({values["image_qos"]})')

    def _create_depth_io(self) -> None:
        if self.depth is not None:
            self.depth.destroy()
            self.depth = None
        values = self._snapshot().values
        if values['depth.use']:
            qos = QoSProfile(depth=5, reliability=IMAGE_QOS_PROFILES[values['image_qos']].reliability)
            self.depth = DepthIO(self._node, {name: values[name] for name in DEPTH_FIELDS}, qos, OUTPUT_QOS,
                                 self.depth_counts, self._health.warn, self._depth_group)

    # ------------------------------------------------------------------ frames (image callback, worker)
    def on_image(self, msg: Image | CompressedImage) -> None:
        """Keep only the newest frame; the worker takes it when it is free."""
        self._health.counters.add('received')
        if self.worker.offer(msg):
            self._health.counters.add('dropped')

    def _failed(self, error: Exception) -> None:
        if not self._node.context.ok():
            return  # shut down under a frame in flight (its publisher's context is gone): it ends quietly
        self._health.counters.add('failed')
        self._health.error(f'frame skipped: {type(error).__name__}: {error}')

    def _wanted_outputs(self, values: Mapping[str, Any]) -> set[str]:
        """Outputs switched on that somebody subscribes to."""
        with self._io_lock:
            if not self._node.context.ok():
                return set()
            return {name for name, pub in self._outputs.items() if values[f'publish_{name}']
                    and pub.get_subscription_count() > 0}

    @staticmethod
    def _running(now: Snapshot) -> TridentPipeline:
        """The snapshot's models, running its configuration (the worker is their only caller)."""
        pipeline = now.pipeline
        if now.config is not None and pipeline.config != now.config:
            pipeline.apply_label_config(now.config)
        return pipeline

    def _process(self, frame: Frame) -> None:
        now, depth = self._snapshot(), self.depth  # this frame runs on them, whatever changes meanwhile
        if now.pipeline is None or not now.active:
            return
        if not self._wanted_outputs(now.values) and not (depth is not None and depth.has_subscribers()):
            self._health.counters.add('skipped_no_subscribers')
            return
        start = time.monotonic()
        max_pixels = now.values['max_input_pixels']
        try:
            if isinstance(frame.msg, CompressedImage):
                rgb = compressed_to_rgb(frame.msg, max_pixels)
            else:
                rgb = conversions.image_to_rgb(frame.msg, max_pixels)
        except ImageConversionError as error:
            self._health.counters.add('rejected')
            self._health.warn(f'image:{error.reason}', f'image refused: {error}')
            return
        timings = {'queue': start - frame.received, 'conversion': time.monotonic() - start}
        if depth is not None:
            depth.pin(frame.msg.header)
        frame_id = frame.msg.header.frame_id
        if self._fault_frame_id and frame_id == self._fault_frame_id:
            raise torch.cuda.OutOfMemoryError(f'simulated by {FAULT_FRAME_ID_ENV} (test hook)')
        pipeline = self._running(now)
        last = LastFrame(frame.msg.header, rgb, pipeline.encode_image(rgb))
        if self._slow_frame_id and frame_id == self._slow_frame_id:
            self._node.get_logger().info(f'frame held {SLOW_FRAME_S} s ({SLOW_FRAME_ID_ENV}, test hook)')
            time.sleep(SLOW_FRAME_S)
        self._last = (last, pipeline)
        if self._snapshot().pipeline is not pipeline:
            self._last = None  # the models were dropped meanwhile: let go of them
        if now.vocabulary is None:
            self._health.warn('no_vocabulary', 'no vocabulary yet: frame encoded, nothing labelled '
                              '(ros2 topic pub --once ~/vocabulary std_msgs/msg/String "{data: \'door, chair\'}")')
            return
        segmentation = pipeline.label(last.features, now.vocabulary)
        if self._publish(now, depth, last, segmentation, timings, start):
            self._health.counters.add('processed')
            self._health.frame_succeeded()

    def _relabel_last(self) -> None:
        now, last = self._snapshot(), self._last
        if last is None or now.vocabulary is None or last[1] is not now.pipeline \
                or not self._wanted_outputs(now.values):
            return
        start = time.monotonic()
        pipeline = self._running(now)
        segmentation = pipeline.label(last[0].features, now.vocabulary)
        if self._publish(now, self.depth, last[0], segmentation, {}, start):
            self._health.counters.add('relabelled')
            self._node.get_logger().info(f'relabelled the last frame with {now.vocabulary.num_classes} classes, no '
                                         f'image encoder run (image_encoder_calls={pipeline.image_encoder_calls})')

    def _publish(self, now: Snapshot, depth: DepthIO | None, last: LastFrame, seg: Segmentation,
                 timings: dict[str, float], start: float) -> bool:
        """Publish a frame's outputs; False if the node shut down or deactivated meanwhile (nothing published)."""
        published = time.monotonic()
        header, vocabulary = last.header, now.vocabulary
        frame_3d = depth.compute(header, seg) if depth is not None else None
        depth_seconds = time.monotonic() - published  # 3D statistics, plus ~/points etc. below
        messages = segmentation_messages(seg, last, vocabulary.num_classes, self._wanted_outputs(now.values), frame_3d)
        with self._io_lock:
            if not self._node.context.ok() or not self._outputs:
                return False  # a frame in flight at shutdown or deactivate ends quietly
            for name, msg in messages.items():
                self._outputs[name].publish(msg)
            if frame_3d is not None and depth is self.depth:
                depth_seconds += depth.publish(frame_3d, seg, vocabulary.first_names, header)
        done = time.monotonic()
        self._health.frame_published(header.frame_id, f'{header.stamp.sec}.{header.stamp.nanosec:09d}',
                                     {**timings, **seg.timings, 'publish': done - published, 'total': done - start,
                                      **({'depth_3d': depth_seconds} if depth is not None else {})})
        return True
