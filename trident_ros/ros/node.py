"""The ``trident`` lifecycle node (a thin ROS 2 adapter over :class:`trident_ros.pipeline.TridentPipeline`).

* configure loads the models, encodes ``vocabulary`` and opens the vocabulary topics (:mod:`.vocabulary_topics`)
  until cleanup; activate opens the camera and the outputs (:mod:`.frame_io`) until deactivate; cleanup drops
  the models. A failed transition returns FAILURE with the reason; the process (:mod:`.main`) stays up;
* the image callback offers the newest frame to ONE frame worker thread (:mod:`.frame_worker`);
* a vocabulary (topic or parameter): receive → parse (cheap; refused with a reason) → parameter
  ``vocabulary`` → the vocabulary thread (:mod:`.vocabulary_worker`; a newer one supersedes it)
  → in use → the last frame relabelled from its cached image features → published;
* parameters: :mod:`.parameters`, callbacks per distro :mod:`.compat`; labelling fields apply at
  once (one relabel per batch), model fields (``pipeline.MODEL_FIELDS``) at the next configure;
* nothing received can take the node down (docs/reliability.md): bad input is refused with a
  throttled warning and the last good state stays; :mod:`.health` counts it for /diagnostics.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.qos import QoSProfile
from rclpy.subscription import Subscription
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from trident_ros.config import ConfigError
from trident_ros.labelling import Segmentation
from trident_ros.models.weights import WeightsError
from trident_ros.pipeline import MODEL_FIELDS, TridentPipeline
from trident_ros.ros import conversions
from trident_ros.ros.compat import PRE_POST_SET_CALLBACKS, add_parameter_callbacks
from trident_ros.ros.conversions import ImageConversionError
from trident_ros.ros.depth_io import DEPTH_FIELDS, DepthCounts, DepthIO
from trident_ros.ros.frame_io import (
    IMAGE_QOS_PROFILES,
    OUTPUT_QOS,
    LastFrame,
    create_image_subscription,
    create_outputs,
    segmentation_messages,
)
from trident_ros.ros.frame_worker import Frame, FrameWorker
from trident_ros.ros.health import NodeHealth, depth_values, idle_reason, message_kind, pipeline_values
from trident_ros.ros.parameters import (
    CONFIG_FIELDS,
    check_changes,
    coerce_parameters,
    config_from_values,
    declare_parameters,
    parameter_defaults,
)
from trident_ros.ros.vocabulary_topics import VocabularyTopics
from trident_ros.ros.vocabulary_worker import VocabularyEncoder, VocabularyRequest
from trident_ros.vocabulary import Vocabulary, VocabularyError, parse_vocabulary

FAULT_FRAME_ID_ENV = 'TRIDENT_TEST_FAULT_FRAME_ID'
"""Test hook, read once at start (docs/reliability.md): frames whose ``header.frame_id`` equals this
variable's value fail inside the worker as CUDA running out of memory would. Unset (the default) it
does nothing; it cannot be set over ROS."""


class TridentNode(LifecycleNode):
    """Lifecycle node ``trident`` (``config/trident.yaml``); ``pre_post_set_callbacks``: :mod:`.compat`."""

    def __init__(self, pre_post_set_callbacks: bool = PRE_POST_SET_CALLBACKS, **kwargs: Any) -> None:
        super().__init__('trident', **kwargs)
        self._bad_overrides = declare_parameters(self)  # parameter -> why its start value is unusable
        # as applied; read from here, not get_parameter: on Humble they are applied before rclpy stores them
        self._values = {name: self.get_parameter(name).value for name in parameter_defaults()}
        self._health = NodeHealth(self.get_logger())
        self._pipeline: TridentPipeline | None = None
        self._vocabulary: Vocabulary | None = None
        self._vocabulary_text = ''  # the text of _vocabulary
        self._last: LastFrame | None = None
        self._state = 'unconfigured'
        self._fault_frame_id = os.environ.get(FAULT_FRAME_ID_ENV, '')
        self._pipe_lock = threading.Lock()   # one frame-side pipeline caller at a time (it is not thread-safe)
        self._io_lock = threading.RLock()    # publishers/subscriptions vs. the worker publishing
        self._outputs: dict[str, Publisher] = {}
        self._image_sub: Subscription | None = None
        self._vocabulary_topics: VocabularyTopics | None = None
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._depth: DepthIO | None = None  # with use_depth, while active
        self._depth_counts = DepthCounts()
        self._depth_group = MutuallyExclusiveCallbackGroup()
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics,
                                             callback_group=MutuallyExclusiveCallbackGroup())
        add_parameter_callbacks(self, coerce_parameters, self._validate_parameters, self._apply_parameters,
                                pre_post_set_callbacks)
        self._encoder = VocabularyEncoder(self._on_vocabulary_encoded, self._on_vocabulary_failed)
        self._worker = FrameWorker(self._process, self._relabel_last, self._frame_failed)
        self.get_logger().info(f'ready (unconfigured); image decoding: {conversions.IMAGE_BACKEND}')

    # ------------------------------------------------------------------ parameters
    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Refuse invalid values with a reason (cheap checks only); the old values stay."""
        changes = {p.name: p.value for p in parameters if p.name in self._values}
        if not changes:
            return SetParametersResult(successful=True)
        try:
            check_changes(self._values, changes)
        except (ConfigError, VocabularyError, ValueError) as error:
            if 'vocabulary' in changes:
                self._health.counters.vocabularies_refused += 1
            self._health.warn(f'parameter:{message_kind(error)}', f'parameter change refused: {error}')
            return SetParametersResult(successful=False, reason=str(error))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        """Act on the values that changed (a value set to what it was changes nothing, silently)."""
        changed = set()
        for param in parameters:
            if param.name in self._bad_overrides:
                self._bad_overrides.pop(param.name)  # set again, with a value that passed validation
                changed.add(param.name)
            if param.name in self._values and param.value != self._values[param.name]:
                self._values[param.name] = param.value
                changed.add(param.name)
        live = sorted(name for name in changed & set(CONFIG_FIELDS) if name not in MODEL_FIELDS)
        reload = sorted(name for name in changed if name in MODEL_FIELDS)
        if live:
            with self._pipe_lock:
                if self._pipeline is not None:
                    self._pipeline.apply_label_config(config_from_values(self._values))
            self.get_logger().info(f'applied at once: {", ".join(live)}')
            if 'prob_thd' in live:
                self._publish_vocabulary_info()  # LabelInfo.threshold
            self._worker.request_relabel()
        if reload:
            self.get_logger().info(f'{", ".join(reload)} take(s) effect at the next configure '
                                   '(ros2 lifecycle set <node> deactivate, cleanup, configure, activate)')
        if 'vocabulary' in changed:
            self._request_vocabulary(self._values['vocabulary'])
        if changed & {'image_transport', 'image_qos'}:
            with self._io_lock:
                if self._image_sub is not None:
                    self._create_image_input()
        if changed & (DEPTH_FIELDS | {'image_qos'}):
            with self._io_lock:
                if self._image_sub is not None:
                    self._create_depth_io()

    # ------------------------------------------------------------------ vocabulary
    def _on_vocabulary(self, msg: String) -> None:
        """~/vocabulary: parse (refused with a reason) and set the ``vocabulary`` parameter."""
        text = msg.data
        if text == self._values['vocabulary']:
            return  # a latched publisher reaches both subscriptions; the same text changes nothing
        try:
            parse_vocabulary(text, max_classes=self._values['max_classes'])
        except VocabularyError as error:
            self._health.counters.vocabularies_refused += 1
            self._health.warn(f'vocabulary:{message_kind(error)}',
                              f'vocabulary from ~/vocabulary refused, keeping the last good one: {error}')
            return
        result = self.set_parameters([Parameter('vocabulary', Parameter.Type.STRING, text)])[0]
        if not result.successful:
            self._health.warn(f'vocabulary:{message_kind(result.reason)}',
                              f'vocabulary from ~/vocabulary refused, keeping the last good one: {result.reason}')

    def _request_vocabulary(self, text: str) -> None:
        """Hand a parsed vocabulary to the vocabulary thread (models loaded) or keep it for configure."""
        with self._pipe_lock:
            pipeline = self._pipeline
        if pipeline is None:
            self.get_logger().info(f'vocabulary {text[:80]!r} stored; it is encoded at configure')
        elif text == self._vocabulary_text:
            self._encoder.cancel()  # back to the vocabulary in use: nothing to encode
        else:
            self._encoder.submit(text, pipeline)

    def _on_vocabulary_encoded(self, request: VocabularyRequest, vocabulary: Vocabulary) -> None:
        """Vocabulary thread: ``request`` is encoded; it is used from the next frame and relabels the last."""
        with self._pipe_lock:
            if request.pipeline is not self._pipeline:
                return  # encoded by models dropped since
        self._use_vocabulary(request.text, vocabulary)

    def _on_vocabulary_failed(self, request: VocabularyRequest, error: Exception) -> None:
        """Vocabulary thread: ``request`` could not be encoded; the vocabulary in use stays."""
        self._health.counters.vocabularies_refused += 1
        self._health.warn(f'vocabulary:{type(error).__name__}', f'vocabulary {request.text[:80]!r} could not be '
                          f'encoded, keeping the last good one: {type(error).__name__}: {error}')
        if self._vocabulary_text and self._values['vocabulary'] == request.text:
            self.set_parameters([Parameter('vocabulary', Parameter.Type.STRING, self._vocabulary_text)])

    def _use_vocabulary(self, text: str, vocabulary: Vocabulary) -> None:
        with self._pipe_lock:
            self._vocabulary, self._vocabulary_text = vocabulary, text
        for warning in vocabulary.warnings:
            self.get_logger().warning(f'vocabulary: {warning}')
        self.get_logger().info(f'vocabulary: {vocabulary.num_classes} classes '
                               f'({", ".join(vocabulary.names[:8])}{", ..." if vocabulary.num_classes > 8 else ""})')
        if vocabulary.num_classes > 255:
            self._health.warn('labels:mono16', f'{vocabulary.num_classes} classes: ~/labels is mono16, which Nav2\'s '
                              'semantic_segmentation_layer cannot read (it needs <= 255 classes, mono8)')
        self._publish_vocabulary_info()
        self._worker.request_relabel()

    def _publish_vocabulary_info(self) -> None:
        with self._io_lock:
            if self._vocabulary_topics is not None and self._vocabulary is not None:
                self._vocabulary_topics.publish(self._vocabulary, self._values['prob_thd'])

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            if self._bad_overrides:
                raise ConfigError('; '.join(self._bad_overrides.values()))
            config = config_from_values(self._values)
            self.get_logger().info('loading models ...')
            pipeline = TridentPipeline(config)
        except (ConfigError, WeightsError) as error:
            return self._fail_configure(str(error))
        except Exception as error:  # anything else the model libraries raise: still a clean FAILURE
            return self._fail_configure(f'{type(error).__name__}: {error}')
        with self._pipe_lock:
            self._pipeline = pipeline
        self._health.clear_error()
        self.get_logger().info(pipeline.describe())
        if conversions.VISION_MSGS_MISSING:  # no ~/label_info (here) and no ~/detections_3d (DepthIO)
            self.get_logger().warning(conversions.VISION_MSGS_MISSING, once=True)
        with self._io_lock:
            self._vocabulary_topics = VocabularyTopics(self, self._on_vocabulary)
        text = self._values['vocabulary']
        if text:
            try:
                self._use_vocabulary(text, pipeline.encode_vocabulary(text))
            except Exception as error:  # VocabularyError, or the text encoder failing: models stay usable
                self._health.warn(f'vocabulary:{message_kind(error)}',
                                  f'vocabulary {text[:80]!r} refused: {error}; send one on ~/vocabulary')
        self._state = 'inactive'
        return TransitionCallbackReturn.SUCCESS

    def _fail_configure(self, reason: str) -> TransitionCallbackReturn:
        self._health.error(f'configure failed: {reason}', log=False)
        self.get_logger().error(f'configure failed: {reason}')
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            with self._io_lock:
                self._outputs = create_outputs(self)
            self._create_image_input()
            with self._io_lock:
                self._create_depth_io()
        except Exception as error:  # e.g. an invalid qos_overrides value: a clean FAILURE, still inactive
            self._remove_frame_io()
            self._health.error(f'activate failed: {error}', log=False)
            self.get_logger().error(f'activate failed: {error}')
            return TransitionCallbackReturn.FAILURE
        self._state = 'active'
        self.get_logger().info('active')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._remove_frame_io()
        self._free_gpu_cache()
        self._state = 'inactive'
        self.get_logger().info('inactive')
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._remove_vocabulary_io()
        self._drop_models()
        self._state = 'unconfigured'
        self.get_logger().info('models released (unconfigured)')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release_all('finalized')
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error('error during a transition: dropping models, back to unconfigured')
        self._release_all('unconfigured')
        return TransitionCallbackReturn.SUCCESS

    def _release_all(self, state: str) -> None:
        self._remove_frame_io()
        self._remove_vocabulary_io()
        self._drop_models()
        self._state = state

    def _drop_models(self) -> None:
        self._encoder.cancel()
        with self._pipe_lock:
            self._pipeline, self._vocabulary, self._vocabulary_text, self._last = None, None, '', None
        self._free_gpu_cache()

    @staticmethod
    def _free_gpu_cache() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ I/O set-up
    def _remove_vocabulary_io(self) -> None:
        with self._io_lock:
            if self._vocabulary_topics is not None:
                self._vocabulary_topics.destroy()
                self._vocabulary_topics = None

    def _create_image_input(self) -> None:
        """Activate → deactivate: the camera subscription, replaced when ``image_transport``/``image_qos`` change."""
        with self._io_lock:
            if self._image_sub is not None:
                self.destroy_subscription(self._image_sub)
            self._image_sub = create_image_subscription(self, self._values['image_transport'],
                                                        self._values['image_qos'], self._on_image, self._image_group)
        self.get_logger().info(f'subscribed to {self._image_sub.topic_name} ({self._values["image_qos"]})')

    def _create_depth_io(self) -> None:
        """(Re)make the depth subscriptions and 3D publishers when ``use_depth`` is on (under _io_lock)."""
        if self._depth is not None:
            self._depth.destroy()
            self._depth = None
        if self._values['use_depth']:
            qos = QoSProfile(depth=5, reliability=IMAGE_QOS_PROFILES[self._values['image_qos']].reliability)
            self._depth = DepthIO(self, self._values, qos, OUTPUT_QOS, self._depth_counts, self._health.warn,
                                  self._depth_group)

    def _remove_frame_io(self) -> None:
        with self._io_lock:
            if self._image_sub is not None:
                self.destroy_subscription(self._image_sub)
                self._image_sub = None
            if self._depth is not None:
                self._depth.destroy()
                self._depth = None
            for pub in self._outputs.values():
                self.destroy_publisher(pub)
            self._outputs = {}
        self._worker.clear()

    # ------------------------------------------------------------------ frames
    def _on_image(self, msg: Image | CompressedImage) -> None:
        """Keep only the newest frame; the worker takes it when it is free."""
        self._health.counters.received += 1
        if self._worker.offer(msg):
            self._health.counters.dropped += 1

    def _frame_failed(self, error: Exception) -> None:
        self._health.counters.failed += 1
        self._health.error(f'frame skipped: {type(error).__name__}: {error}')

    def _wanted_outputs(self) -> set[str]:
        """Outputs switched on that somebody subscribes to."""
        with self._io_lock:
            return {name for name, pub in self._outputs.items() if self._values[f'publish_{name}']
                    and pub.get_subscription_count() > 0}

    def _process(self, frame: Frame) -> None:
        if self._pipeline is None or self._state != 'active':
            return
        if not self._wanted_outputs() and not (self._depth is not None and self._depth.has_subscribers()):
            self._health.counters.skipped_no_subscribers += 1
            return
        start = time.monotonic()
        max_pixels = self._values['max_input_pixels']
        try:
            if isinstance(frame.msg, CompressedImage):
                rgb = conversions.compressed_to_rgb(frame.msg, max_pixels)
            else:
                rgb = conversions.image_to_rgb(frame.msg, max_pixels)
        except ImageConversionError as error:
            self._health.counters.rejected += 1
            self._health.warn(f'image:{error.reason}', f'image refused: {error}')
            return
        timings = {'queue': start - frame.received, 'conversion': time.monotonic() - start}
        if self._depth is not None:
            self._depth.pin(frame.msg.header)
        if self._fault_frame_id and frame.msg.header.frame_id == self._fault_frame_id:
            raise torch.cuda.OutOfMemoryError(f'simulated by {FAULT_FRAME_ID_ENV} (test hook)')
        with self._pipe_lock:
            if self._pipeline is None:
                return
            last = self._last = LastFrame(frame.msg.header, rgb, self._pipeline.encode_image(rgb))
            vocabulary = self._vocabulary
            segmentation = self._pipeline.label(last.features, vocabulary) if vocabulary is not None else None
        if segmentation is None:
            self._health.warn('no_vocabulary', 'no vocabulary yet: frame encoded, nothing labelled '
                              '(ros2 topic pub --once ~/vocabulary std_msgs/msg/String "{data: \'door, chair\'}")')
            return
        self._publish(last, segmentation, vocabulary, timings, start)
        self._health.counters.processed += 1
        self._health.frame_succeeded()

    def _relabel_last(self) -> None:
        with self._pipe_lock:
            last, vocabulary, pipeline = self._last, self._vocabulary, self._pipeline
            if last is None or vocabulary is None or pipeline is None or not self._wanted_outputs():
                return
            start = time.monotonic()
            segmentation = pipeline.label(last.features, vocabulary)
            calls = pipeline.image_encoder_calls
        self._publish(last, segmentation, vocabulary, {}, start)
        self._health.counters.relabelled += 1
        self.get_logger().info(f'relabelled the last frame with {vocabulary.num_classes} classes, no image '
                               f'encoder run (image_encoder_calls={calls})')

    def _publish(self, last: LastFrame, seg: Segmentation, vocabulary: Vocabulary,
                 timings: dict[str, float], start: float) -> None:
        published = time.monotonic()
        header = last.header
        depth = self._depth
        frame_3d = depth.compute(header, seg) if depth is not None else None
        depth_seconds = time.monotonic() - published  # 3D statistics, plus ~/points etc. below
        messages = segmentation_messages(seg, last, vocabulary.num_classes, self._wanted_outputs(), frame_3d)
        with self._io_lock:
            for name, msg in messages.items():
                if name in self._outputs:
                    self._outputs[name].publish(msg)
            if frame_3d is not None and depth is self._depth:
                depth_seconds += depth.publish(frame_3d, seg, vocabulary.first_names, header)
        now = time.monotonic()
        self._health.frame_published(header.frame_id, f'{header.stamp.sec}.{header.stamp.nanosec:09d}',
                                     {**timings, **seg.timings, 'publish': now - published, 'total': now - start,
                                      **({'depth_3d': depth_seconds} if depth is not None else {})})

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        status = self.diagnostic_status()
        self._diag_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    def diagnostic_status(self) -> DiagnosticStatus:
        """The node's health: OK, WARN (recent bad input, no vocabulary, not active) or ERROR."""
        vocabulary, pending = self._vocabulary, self._encoder.pending()
        values = {**pipeline_values(self._pipeline, vocabulary, pending), 'image_decoder': conversions.IMAGE_BACKEND,
                  **depth_values(self._depth_counts)}
        return self._health.status(f'{self.get_fully_qualified_name()}: segmentation', self._state, values,
                                   idle_reason(self._state, vocabulary, pending))

    # ------------------------------------------------------------------ shutdown
    def stop_worker(self, timeout: float) -> bool:
        """Ask the frame worker and the vocabulary thread to stop; True if both ended within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        worker_stopped = self._worker.stop(timeout)
        return self._encoder.stop(max(0.0, deadline - time.monotonic())) and worker_stopped

