"""The ``trident`` lifecycle node: camera images and a vocabulary in, segmentation outputs out.

A thin ROS 2 adapter over :class:`trident_ros.pipeline.TridentPipeline`:

* configure loads the models (a failure returns FAILURE with the reason; the process stays up),
  activate creates the subscriptions and publishers, deactivate removes them and frees GPU
  caches, cleanup drops the models;
* the image callback only stores the newest frame; ONE worker thread encodes and labels it;
  frames replaced before the worker took them are dropped (counted), never queued;
* a new vocabulary (topic ``~/vocabulary`` or parameter ``vocabulary``) relabels the last frame
  from its cached image features: no image encoder runs;
* every field of :class:`TridentConfig` is a parameter; labelling fields apply at once, model
  fields (``pipeline.MODEL_FIELDS``) at the next configure;
* nothing received can take the node down (docs/reliability.md): a bad image, vocabulary or
  parameter is refused with a warning (logged at most once per kind of problem every
  WARN_EVERY_S) and the last good state stays; a frame that fails in the pipeline is skipped with
  an ERROR status and the GPU cache released; /diagnostics counts all of it.
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import InvalidParameterTypeException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.subscription import Subscription
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from trident_ros import conversions
from trident_ros.config import ConfigError, TridentConfig
from trident_ros.conversions import ImageConversionError
from trident_ros.depth_io import DEPTH_FIELDS, DepthCounts, DepthIO
from trident_ros.labelling import Segmentation
from trident_ros.msg import ClassMaskArray, VocabularyInfo
from trident_ros.pipeline import MODEL_FIELDS, ImageFeatures, TridentPipeline
from trident_ros.visualization import class_colors
from trident_ros.vocabulary import Vocabulary, VocabularyError, parse_vocabulary
from trident_ros.weights import WeightsError

CONFIG_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TridentConfig)}
CHECKPOINT_FIELDS = ('sam_checkpoint', 'dino_checkpoint')  # local files TridentConfig.validate looks up
IMAGE_TRANSPORTS = ('raw', 'compressed')
IMAGE_QOS = ('sensor_data', 'reliable')
OUTPUTS = ('segmentation', 'labels', 'confidence', 'masks')
NODE_PARAMETERS: dict[str, tuple[Any, str]] = {
    'vocabulary': ('', 'classes separated by ",", synonyms of one class by ";" (e.g. "sofa; couch, door"); '
                       'empty: none yet (frames are encoded, nothing is labelled until one arrives)'),
    'image_transport': ('raw', 'raw: subscribe "image" (sensor_msgs/Image); compressed: "image/compressed" '
                               '(sensor_msgs/CompressedImage)'),
    'image_qos': ('sensor_data', 'QoS of the image subscription: sensor_data (best effort, depth 1, matches '
                                 'every camera) or reliable (depth 1, only matches reliable publishers)'),
    'max_input_pixels': (16_777_216, 'images with more pixels (width*height) are refused with a warning, '
                                     'not downscaled (outputs keep the input pixel grid)'),
    'publish_segmentation': (True, 'publish ~/segmentation (rgb8 overlay with a legend)'),
    'publish_labels': (True, 'publish ~/labels (mono8, mono16 past 255 classes; 0 = unlabeled)'),
    'publish_confidence': (True, 'publish ~/confidence (mono8, probability * 255)'),
    'publish_masks': (True, 'publish ~/masks (trident_ros/ClassMaskArray)'),
}
IMAGE_QOS_PROFILES = {
    'sensor_data': QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                              durability=DurabilityPolicy.VOLATILE),
    'reliable': QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.VOLATILE),
}
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE)
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
# ~/vocabulary: a volatile subscription always (it matches `ros2 topic pub` defaults and every
# other publisher); while a transient-local (latched) publisher exists, also a transient-local one,
# which receives what that publisher sent before it matched. It is not kept all the time because a
# transient-local subscription is incompatible with volatile publishers, which then print warnings.
VOCABULARY_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
RECENT_S = 10.0  # how long a warning or error keeps the diagnostics status raised
WARN_EVERY_S = 5.0  # log the same kind of warning at most this often
MAX_WARNING_KINDS = 64  # kinds remembered for throttling (older ones are forgotten)
FAULT_FRAME_ID_ENV = 'TRIDENT_TEST_FAULT_FRAME_ID'
"""Test hook, read once at start (docs/reliability.md): frames whose ``header.frame_id`` equals this
variable's value fail inside the worker as CUDA running out of memory would. Unset (the default) it
does nothing; it cannot be set over ROS."""
SHUTDOWN_WAIT_S = 1.0  # how long shutdown waits for a frame in progress


@dataclass
class Frame:
    """A received image message and when it arrived (time.monotonic())."""

    msg: Image | CompressedImage
    received: float


@dataclass
class LastFrame:
    """What a vocabulary change needs to relabel the last frame without its image encoders."""

    header: Header
    rgb: np.ndarray  # (H, W, 3) uint8
    features: ImageFeatures


@dataclass
class Stats:
    """Counters and the latest timings, read by the diagnostics timer."""

    received: int = 0
    processed: int = 0
    relabelled: int = 0
    dropped: int = 0
    rejected: int = 0
    failed: int = 0
    skipped_no_subscribers: int = 0
    vocabularies_refused: int = 0
    latency: tuple[str, str, dict[str, float]] = ('', '', {})
    """The last published frame's ``frame_id``, stamp (``sec.nanosec``) and timings (ms), set at once."""
    done: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=256))
    warning: tuple[float, str] | None = None
    error: tuple[float, str] | None = None
    error_published: bool = False  # the current error went out on /diagnostics at least once


class TridentNode(LifecycleNode):
    """Lifecycle node ``trident``: see the module docstring and ``config/trident.yaml``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('trident', **kwargs)
        self._bad_overrides: dict[str, str] = {}  # parameter -> why its start value has the wrong type
        self._declare_parameters()
        self._pipeline: TridentPipeline | None = None
        self._vocabulary: Vocabulary | None = None
        self._staged_vocabulary: tuple[str, Vocabulary] | None = None
        self._last: LastFrame | None = None
        self._state = 'unconfigured'
        self._stats = Stats()
        self._warned: dict[str, float] = {}  # warning kind -> when it was last logged
        self._fault_frame_id = os.environ.get(FAULT_FRAME_ID_ENV, '')
        self._topic_change = threading.local()  # .active: ~/vocabulary is setting the parameter (it warns itself)
        self._pipe_lock = threading.Lock()   # one pipeline caller at a time (it is not thread-safe)
        self._io_lock = threading.RLock()    # publishers/subscriptions vs. the worker publishing
        self._work = threading.Condition()   # guards _pending, _relabel, _stopping
        self._pending: Frame | None = None
        self._relabel = False
        self._stopping = False
        self._pubs: dict[str, Publisher] = {}
        self._image_sub: Subscription | None = None
        self._vocabulary_sub: Subscription | None = None
        self._latched_vocabulary_sub: Subscription | None = None
        self._latch_watch: Any = None  # timer looking for latched vocabulary publishers while active
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._depth: DepthIO | None = None  # with use_depth, while active
        self._depth_counts = DepthCounts()
        self._depth_group = MutuallyExclusiveCallbackGroup()
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics,
                                             callback_group=MutuallyExclusiveCallbackGroup())
        self.add_pre_set_parameters_callback(self._coerce_parameters)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._worker = threading.Thread(target=self._run_worker, name='trident_worker', daemon=True)
        self._worker.start()
        self.get_logger().info(f'ready (unconfigured); image decoding: {conversions.IMAGE_BACKEND}')

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        defaults = TridentConfig()
        for name in CONFIG_FIELDS:
            note = ' [takes effect at the next configure]' if name in MODEL_FIELDS else ' [applies at once]'
            self._declare(name, getattr(defaults, name), TridentConfig.describe(name) + note)
        for name, (default, description) in NODE_PARAMETERS.items():
            self._declare(name, default, description)

    def _declare(self, name: str, default: Any, description: str) -> None:
        """Declare a typed parameter; an override of the wrong type (e.g. ``40`` for a float in
        YAML) must not kill the process: it is declared dynamically typed and checked at configure."""
        try:
            self.declare_parameter(name, default, ParameterDescriptor(description=description))
        except InvalidParameterTypeException as error:
            self.declare_parameter(name, default, ParameterDescriptor(description=description, dynamic_typing=True))
            value = self.get_parameter(name).value
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                return  # an integer for a float: fine, TridentConfig.from_dict converts it
            self._bad_overrides[name] = str(error)

    def _coerce_parameters(self, parameters: list[Parameter]) -> list[Parameter]:
        """``ros2 param set /trident logit_scale 50``: an integer for a float parameter is fine."""
        out = []
        for param in parameters:
            field = CONFIG_FIELDS.get(param.name)
            if (field is not None and isinstance(field.default, float)
                    and param.type_ == Parameter.Type.INTEGER):
                param = Parameter(param.name, Parameter.Type.DOUBLE, float(param.value))
            out.append(param)
        return out

    def _config_from_parameters(self, changes: Mapping[str, Any] | None = None,
                                check_unchanged_files: bool = True) -> TridentConfig:
        """TridentConfig from the current parameters with ``changes`` applied; raises ConfigError.

        ``check_unchanged_files=False`` (runtime changes): a checkpoint path that is not in ``changes``
        is not looked up again. It was checked when it was set, and configure reports it if the file
        has gone since; a moved file must not block, e.g., a vocabulary change.
        """
        changes = changes or {}
        values = {name: changes[name] if name in changes else self.get_parameter(name).value for name in CONFIG_FIELDS}
        if not check_unchanged_files:
            values.update({name: '' for name in CHECKPOINT_FIELDS if name not in changes})
        return TridentConfig.from_dict(values)

    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Refuse invalid values with a reason; the old values stay."""
        changes = {p.name: p.value for p in parameters}
        try:
            config = self._config_from_parameters(changes, check_unchanged_files=False)
            self._check_node_parameters(changes)
            if 'vocabulary' in changes:
                text = changes['vocabulary']
                self._staged_vocabulary = (text, self._encode_vocabulary(text, config))
        except (ConfigError, VocabularyError, ValueError) as error:
            return self._refuse(changes, str(error), message_kind(error))
        except Exception as error:  # e.g. out of memory while encoding a vocabulary: refuse, never crash
            self._free_gpu_cache()
            return self._refuse(changes, f'{type(error).__name__}: {error}', type(error).__name__)
        return SetParametersResult(successful=True)

    def _refuse(self, changes: Mapping[str, Any], reason: str, kind: str) -> SetParametersResult:
        """Count and report a refused parameter change (~/vocabulary reports its own refusals)."""
        if 'vocabulary' in changes:
            self._stats.vocabularies_refused += 1
        if not getattr(self._topic_change, 'active', False):
            self._warn(f'parameter:{kind}', f'parameter change refused: {reason}')
        return SetParametersResult(successful=False, reason=reason)

    @staticmethod
    def _check_node_parameters(changes: Mapping[str, Any]) -> None:
        if changes.get('image_transport', 'raw') not in IMAGE_TRANSPORTS:
            raise ValueError(f'image_transport={changes["image_transport"]!r}: '
                             f'must be one of {", ".join(IMAGE_TRANSPORTS)}')
        if changes.get('image_qos', 'reliable') not in IMAGE_QOS:
            raise ValueError(f'image_qos={changes["image_qos"]!r}: must be one of {", ".join(IMAGE_QOS)}')
        if changes.get('max_input_pixels', 1) < 1:
            raise ValueError(f'max_input_pixels={changes["max_input_pixels"]}: must be positive')
        device = changes.get('device', 'cpu')
        if device.startswith('cuda'):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(device[5:]) if device.startswith('cuda:') else 0
            if index >= count:
                raise ValueError(f'device={device!r}: this machine has {count} CUDA device(s)')

    def _encode_vocabulary(self, text: str, config: TridentConfig) -> Vocabulary | None:
        """Encode ``text`` when the models are loaded (None otherwise, after a parse check)."""
        with self._pipe_lock:
            if self._pipeline is not None:
                return self._pipeline.encode_vocabulary(text)
        parse_vocabulary(text, max_classes=config.max_classes)
        return None

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        names = {p.name for p in parameters}
        for name in names:
            self._bad_overrides.pop(name, None)  # set again, with a value that passed validation
        config_changed = names & set(CONFIG_FIELDS)
        if config_changed:
            self._apply_config_change(sorted(config_changed))
        if 'vocabulary' in names and self._staged_vocabulary is not None:
            text, vocabulary = self._staged_vocabulary
            self._staged_vocabulary = None
            if vocabulary is not None:
                self._set_vocabulary(vocabulary)
            else:
                self.get_logger().info(f'vocabulary {text[:80]!r} stored; it is encoded at configure')
        if names & {'image_transport', 'image_qos'}:
            with self._io_lock:
                if self._image_sub is not None:
                    self._create_image_subscription()
        if names & (DEPTH_FIELDS | {'image_qos'}):
            with self._io_lock:
                if self._image_sub is not None:
                    self._create_depth_io()

    def _apply_config_change(self, changed: list[str]) -> None:
        reload = [name for name in changed if name in MODEL_FIELDS]
        live = [name for name in changed if name not in MODEL_FIELDS]
        with self._pipe_lock:
            if self._pipeline is not None and live:
                self._pipeline.apply_label_config(self._config_from_parameters(check_unchanged_files=False))
        if 'prob_thd' in live:
            self._publish_vocabulary_info()  # LabelInfo.threshold
        if live:
            self.get_logger().info(f'applied at once: {", ".join(live)}')
            self._request_relabel()
        if reload:
            self.get_logger().info(f'{", ".join(reload)} take(s) effect at the next configure '
                                   '(ros2 lifecycle set <node> deactivate, cleanup, configure, activate)')

    def _set_vocabulary(self, vocabulary: Vocabulary) -> None:
        with self._pipe_lock:
            self._vocabulary = vocabulary
        for warning in vocabulary.warnings:
            self.get_logger().warning(f'vocabulary: {warning}')
        self.get_logger().info(f'vocabulary: {vocabulary.num_classes} classes '
                               f'({", ".join(vocabulary.names[:8])}{", ..." if vocabulary.num_classes > 8 else ""})')
        if vocabulary.num_classes > 255:
            self._warn('labels:mono16', f'{vocabulary.num_classes} classes: ~/labels is mono16, which Nav2\'s '
                       'semantic_segmentation_layer cannot read (it needs <= 255 classes, mono8)')
        self._publish_vocabulary_info()
        self._request_relabel()

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            if self._bad_overrides:
                raise ConfigError('; '.join(self._bad_overrides.values()))
            config = self._config_from_parameters()
            self.get_logger().info('loading models ...')
            pipeline = TridentPipeline(config)
        except (ConfigError, WeightsError) as error:
            return self._fail_configure(str(error))
        except Exception as error:  # anything else the model libraries raise: still a clean FAILURE
            return self._fail_configure(f'{type(error).__name__}: {error}')
        with self._pipe_lock:
            self._pipeline = pipeline
        self._stats.error = None
        self.get_logger().info(pipeline.describe())
        text = self.get_parameter('vocabulary').value
        if text:
            try:
                self._set_vocabulary(self._encode_vocabulary(text, config))
            except Exception as error:  # VocabularyError, or the text encoder failing: models stay usable
                self._warn(f'vocabulary:{message_kind(error)}',
                           f'vocabulary {text[:80]!r} refused: {error}; send one on ~/vocabulary')
        self._state = 'inactive'
        return TransitionCallbackReturn.SUCCESS

    def _fail_configure(self, reason: str) -> TransitionCallbackReturn:
        self.get_logger().error(f'configure failed: {reason}')
        self._stats.error = (time.monotonic(), f'configure failed: {reason}')
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._io_lock:
            for name in OUTPUTS:
                msg_type = ClassMaskArray if name == 'masks' else Image
                self._pubs[name] = self.create_publisher(msg_type, f'~/{name}', OUTPUT_QOS)
            self._pubs['vocabulary_info'] = self.create_publisher(VocabularyInfo, '~/vocabulary_info', LATCHED_QOS)
            if conversions.LabelInfo is not None:
                self._pubs['label_info'] = self.create_publisher(conversions.LabelInfo, '~/label_info', LATCHED_QOS)
            self._vocabulary_sub = self.create_subscription(String, '~/vocabulary', self._on_vocabulary,
                                                            VOCABULARY_QOS)
            self._create_image_subscription()
            self._create_depth_io()
        self._watch_latched_vocabulary()
        self._latch_watch = self.create_timer(1.0, self._watch_latched_vocabulary)
        self._state = 'active'
        self._publish_vocabulary_info()
        self.get_logger().info('active')
        return super().on_activate(state)

    def _create_image_subscription(self) -> None:
        if self._image_sub is not None:
            self.destroy_subscription(self._image_sub)
        compressed = self.get_parameter('image_transport').value == 'compressed'
        qos = IMAGE_QOS_PROFILES[self.get_parameter('image_qos').value]
        self._image_sub = self.create_subscription(
            CompressedImage if compressed else Image, 'image/compressed' if compressed else 'image',
            self._on_image, qos, callback_group=self._image_group)
        self.get_logger().info(f'subscribed to {self._image_sub.topic_name} ({self.get_parameter("image_qos").value})')

    def _create_depth_io(self) -> None:
        """(Re)make the depth subscriptions and 3D publishers when ``use_depth`` is on (under _io_lock)."""
        if self._depth is not None:
            self._depth.destroy()
            self._depth = None
        if self.get_parameter('use_depth').value:
            qos = QoSProfile(depth=5, reliability=IMAGE_QOS_PROFILES[self.get_parameter('image_qos').value].reliability)
            self._depth = DepthIO(self, qos, OUTPUT_QOS, self._depth_counts, self._warn, self._depth_group)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._remove_io()
        self._free_gpu_cache()
        self._state = 'inactive'
        self.get_logger().info('inactive')
        return super().on_deactivate(state)

    def _watch_latched_vocabulary(self) -> None:
        """Keep a transient-local ~/vocabulary subscription exactly while a latched publisher exists."""
        with self._io_lock:
            if self._vocabulary_sub is None:
                return
            latched = any(info.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL
                          for info in self.get_publishers_info_by_topic(self._vocabulary_sub.topic_name))
            if latched and self._latched_vocabulary_sub is None:
                self._latched_vocabulary_sub = self.create_subscription(
                    String, '~/vocabulary', self._on_vocabulary, LATCHED_QOS,
                    event_callbacks=SubscriptionEventCallbacks(incompatible_qos=lambda event: None))
            elif not latched and self._latched_vocabulary_sub is not None:
                self.destroy_subscription(self._latched_vocabulary_sub)
                self._latched_vocabulary_sub = None

    def _remove_io(self) -> None:
        if self._latch_watch is not None:
            self.destroy_timer(self._latch_watch)
            self._latch_watch = None
        with self._io_lock:
            for sub in (self._image_sub, self._vocabulary_sub, self._latched_vocabulary_sub):
                if sub is not None:
                    self.destroy_subscription(sub)
            self._image_sub = self._vocabulary_sub = self._latched_vocabulary_sub = None
            if self._depth is not None:
                self._depth.destroy()
                self._depth = None
            for pub in self._pubs.values():
                self.destroy_publisher(pub)
            self._pubs = {}
        with self._work:
            self._pending, self._relabel = None, False

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._drop_models()
        self._state = 'unconfigured'
        self.get_logger().info('models released (unconfigured)')
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._remove_io()
        self._drop_models()
        self._state = 'finalized'
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error('error during a transition: dropping models, back to unconfigured')
        self._remove_io()
        self._drop_models()
        self._state = 'unconfigured'
        return TransitionCallbackReturn.SUCCESS

    def _drop_models(self) -> None:
        with self._pipe_lock:
            self._pipeline, self._vocabulary, self._last = None, None, None
        self._free_gpu_cache()

    @staticmethod
    def _free_gpu_cache() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ callbacks
    def _on_image(self, msg: Image | CompressedImage) -> None:
        """Keep only the newest frame; the worker takes it when it is free."""
        with self._work:
            self._stats.received += 1
            if self._pending is not None:
                self._stats.dropped += 1
            self._pending = Frame(msg, time.monotonic())
            self._work.notify()

    def _on_vocabulary(self, msg: String) -> None:
        if msg.data == self.get_parameter('vocabulary').value:
            return  # a latched publisher reaches both subscriptions; the same text changes nothing
        self._topic_change.active = True
        try:
            result = self.set_parameters([Parameter('vocabulary', Parameter.Type.STRING, msg.data)])[0]
        finally:
            self._topic_change.active = False
        if not result.successful:
            self._warn(f'vocabulary:{message_kind(result.reason)}',
                       f'vocabulary from ~/vocabulary refused, keeping the last good one: {result.reason}')

    def _request_relabel(self) -> None:
        with self._work:
            self._relabel = True
            self._work.notify()

    # ------------------------------------------------------------------ worker
    def _run_worker(self) -> None:
        while True:
            with self._work:
                while not (self._stopping or self._pending is not None or self._relabel):
                    self._work.wait()
                if self._stopping:
                    return
                frame, self._pending = self._pending, None
                relabel, self._relabel = self._relabel, False
            failed = False
            try:
                if frame is not None:
                    self._process(frame)
                elif relabel:
                    self._relabel_last()
            except Exception as error:  # the worker must survive anything a frame can cause
                failed = True
                self._stats.failed += 1
                self._stats.error = (time.monotonic(), f'frame skipped: {type(error).__name__}: {error}')
                self._stats.error_published = False
                self.get_logger().error(f'frame skipped: {type(error).__name__}: {error}',
                                        throttle_duration_sec=5.0)
            if failed:
                # Outside the except block: the traceback (and the tensors its frames hold) is gone
                # now, so the allocator can really give their memory back.
                self._free_gpu_cache()

    def _wanted_outputs(self) -> set[str]:
        """Outputs switched on that somebody subscribes to."""
        with self._io_lock:
            return {name for name in OUTPUTS if name in self._pubs and self.get_parameter(f'publish_{name}').value
                    and self._pubs[name].get_subscription_count() > 0}

    def _process(self, frame: Frame) -> None:
        if self._pipeline is None or self._state != 'active':
            return
        if not self._wanted_outputs() and not (self._depth is not None and self._depth.has_subscribers()):
            self._stats.skipped_no_subscribers += 1
            return
        start = time.monotonic()
        try:
            if isinstance(frame.msg, CompressedImage):
                rgb = conversions.compressed_to_rgb(frame.msg, self.get_parameter('max_input_pixels').value)
            else:
                rgb = conversions.image_to_rgb(frame.msg, self.get_parameter('max_input_pixels').value)
        except ImageConversionError as error:
            self._stats.rejected += 1
            self._warn(f'image:{error.reason}', f'image refused: {error}')
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
            self._warn('no_vocabulary', 'no vocabulary yet: frame encoded, nothing labelled '
                       '(ros2 topic pub --once ~/vocabulary std_msgs/msg/String "{data: \'door, chair\'}")')
            return
        self._publish(last, segmentation, vocabulary, timings, start)
        self._stats.processed += 1
        self._recovered()

    def _relabel_last(self) -> None:
        with self._pipe_lock:
            last, vocabulary, pipeline = self._last, self._vocabulary, self._pipeline
            if last is None or vocabulary is None or pipeline is None or not self._wanted_outputs():
                return
            start = time.monotonic()
            segmentation = pipeline.label(last.features, vocabulary)
            calls = pipeline.image_encoder_calls
        self._publish(last, segmentation, vocabulary, {}, start)
        self._stats.relabelled += 1
        self.get_logger().info(f'relabelled the last frame with {vocabulary.num_classes} classes, no image '
                               f'encoder run (image_encoder_calls={calls})')

    def _publish(self, last: LastFrame, seg: Segmentation, vocabulary: Vocabulary,
                 timings: dict[str, float], start: float) -> None:
        published = time.monotonic()
        header = last.header
        messages: dict[str, Any] = {}
        wanted = self._wanted_outputs()
        depth = self._depth
        frame_3d = depth.compute(header, seg) if depth is not None else None
        points = frame_3d.classes if frame_3d is not None else None
        depth_seconds = time.monotonic() - published  # 3D statistics, plus ~/points etc. below (within publish)
        if 'segmentation' in wanted:
            messages['segmentation'] = conversions.array_to_image(seg.overlay(last.rgb), 'rgb8', header)
        if 'labels' in wanted:
            messages['labels'] = conversions.labels_to_image(seg.labels, vocabulary.num_classes, header)
        if 'confidence' in wanted:
            messages['confidence'] = conversions.confidence_to_image(seg.confidence, header)
        if 'masks' in wanted:
            messages['masks'] = conversions.class_masks_to_msg(seg.masks, seg.vocabulary, header, points,
                                                               frame_3d.frame_id if frame_3d is not None else '')
        with self._io_lock:
            for name, msg in messages.items():
                if name in self._pubs:
                    self._pubs[name].publish(msg)
            if frame_3d is not None and depth is self._depth:
                depth_seconds += depth.publish(frame_3d, seg, first_names(vocabulary), header)
        now = time.monotonic()
        timings = {**timings, **seg.timings, 'publish': now - published, 'total': now - start,
                   **({'depth_3d': depth_seconds} if depth is not None else {})}
        self._stats.latency = (header.frame_id, f'{header.stamp.sec}.{header.stamp.nanosec:09d}',
                               {name: round(seconds * 1000.0, 2) for name, seconds in timings.items()})
        self._stats.done.append(time.monotonic())

    def _publish_vocabulary_info(self) -> None:
        vocabulary = self._vocabulary
        if vocabulary is None:
            return
        header = Header(stamp=self.get_clock().now().to_msg())
        colors = class_colors(vocabulary.num_classes)[1:]
        with self._io_lock:
            if 'vocabulary_info' in self._pubs:
                self._pubs['vocabulary_info'].publish(conversions.vocabulary_info(vocabulary.names, colors, header))
            if 'label_info' in self._pubs:
                self._pubs['label_info'].publish(
                    conversions.label_info(first_names(vocabulary), self.get_parameter('prob_thd').value, header))

    # ------------------------------------------------------------------ diagnostics
    def _warn(self, kind: str, message: str) -> None:
        """A warning in the log (at most one per ``kind`` every WARN_EVERY_S) and in diagnostics."""
        now = time.monotonic()
        self._stats.warning = (now, message)
        if now - self._warned.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            if len(self._warned) >= MAX_WARNING_KINDS:
                self._warned = {k: t for k, t in self._warned.items() if now - t < WARN_EVERY_S}
            self._warned[kind] = now
            self.get_logger().warning(message)

    def _recovered(self) -> None:
        """A frame went through after a frame failed: once the error has been on /diagnostics, it
        becomes a warning (until RECENT_S)."""
        error = self._stats.error
        if error is not None and error[1].startswith('frame skipped') and self._stats.error_published:
            self._stats.error = None
            self._stats.warning = (error[0], f'recovered; earlier {error[1]}')

    def _publish_diagnostics(self) -> None:
        status = self.diagnostic_status()
        self._stats.error_published = status.level == DiagnosticStatus.ERROR
        self._diag_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    def diagnostic_status(self) -> DiagnosticStatus:
        """The node's health: OK, WARN (recent bad input, no vocabulary, not active) or ERROR."""
        now = time.monotonic()
        stats, pipeline, vocabulary = self._stats, self._pipeline, self._vocabulary
        level, message = DiagnosticStatus.OK, 'processing'
        if stats.error is not None and now - stats.error[0] < RECENT_S:
            level, message = DiagnosticStatus.ERROR, stats.error[1]
        elif stats.warning is not None and now - stats.warning[0] < RECENT_S:
            level, message = DiagnosticStatus.WARN, stats.warning[1]
        elif self._state != 'active':
            level, message = DiagnosticStatus.WARN, f'{self._state}: not processing'
        elif vocabulary is None:
            level, message = DiagnosticStatus.WARN, 'no vocabulary'
        device = str(pipeline.models.device) if pipeline is not None else 'none'
        recent = [t for t in stats.done if now - t < RECENT_S]
        values = {
            'lifecycle_state': self._state,
            'device': device,
            'processing_rate_hz': f'{len(recent) / RECENT_S:.2f}',
            'frames_received': stats.received,
            'frames_processed': stats.processed,
            'frames_relabelled': stats.relabelled,
            'frames_dropped': stats.dropped,
            'frames_rejected': stats.rejected,
            'frames_failed': stats.failed,
            'frames_skipped_no_subscribers': stats.skipped_no_subscribers,
            'vocabularies_refused': stats.vocabularies_refused,
            'image_encoder_calls': pipeline.image_encoder_calls if pipeline is not None else 0,
            'image_side_reuses': pipeline.image_side_reuses if pipeline is not None else 0,
            'vocabulary_size': vocabulary.num_classes if vocabulary is not None else 0,
            'image_decoder': conversions.IMAGE_BACKEND,
            'depth_frames_3d': self._depth_counts.with_3d,
            'depth_frames_2d_only': self._depth_counts.no_matching_depth,
            'depth_frames_foreign_frame': self._depth_counts.foreign_frame,
            'depth_refused': self._depth_counts.refused,
        }
        frame_id, stamp, latency_ms = stats.latency
        if latency_ms:  # which frame the latencies describe (frame_id and stamp of its header)
            values.update({'latency_frame_id': frame_id, 'latency_frame_stamp': stamp,
                           **{f'latency_ms.{name}': value for name, value in latency_ms.items()}})
        if pipeline is not None and pipeline.models.device.type == 'cuda':
            values['gpu_memory_allocated_mb'] = f'{torch.cuda.memory_allocated(pipeline.models.device) / 2**20:.1f}'
            values['gpu_memory_reserved_mb'] = f'{torch.cuda.memory_reserved(pipeline.models.device) / 2**20:.1f}'
        return DiagnosticStatus(level=level, name=f'{self.get_fully_qualified_name()}: segmentation', message=message,
                                hardware_id=device, values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])

    # ------------------------------------------------------------------ shutdown
    def stop_worker(self, timeout: float) -> bool:
        """Ask the worker to stop; True if it ended within ``timeout`` seconds."""
        with self._work:
            self._stopping = True
            self._work.notify()
        self._worker.join(timeout)
        return not self._worker.is_alive()


def first_names(vocabulary: Vocabulary) -> list[str]:
    """The first name of each class (what a user writes in Nav2's ``classes``), class id k at k - 1."""
    return [names[0] for names in vocabulary.classes]


def message_kind(error: Exception | str) -> str:
    """A short key of an error message without its quoted text and numbers, so that warnings about
    the same problem with different values are throttled together."""
    return re.sub(r"'[^']*'|\d+", '', str(error))[:48]


def ignore_repeated_signals() -> None:
    """Set SIGINT and SIGTERM to SIG_IGN before rclpy installs its handlers over them.

    rclpy's handlers shut the node down on the first signal and, at shutdown, restore what they
    found. A terminal's Ctrl-C reaches the whole process group and ``ros2 launch`` forwards one
    more SIGINT: with Python's defaults restored, that second signal would kill the exiting
    process ("exit code -2"). SIG_IGN also survives interpreter teardown, which resets Python
    callables to SIG_DFL.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def main(args: list[str] | None = None) -> None:
    """``ros2 run trident_ros trident_node``; exits 0 on SIGINT/SIGTERM, within ~1.5 s even mid-frame."""
    finished = True
    ignore_repeated_signals()
    try:
        with rclpy.init(args=args):
            node = TridentNode()
            executor = MultiThreadedExecutor(num_threads=4)
            executor.add_node(node)
            try:
                executor.spin()
            except Exception:
                if rclpy.ok():
                    raise
                # else a signal shut the context down while the executor built its wait set
            finally:
                finished = node.stop_worker(SHUTDOWN_WAIT_S)
                finished = executor.shutdown(timeout_sec=0.5) and finished
                node.destroy_node()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    # Interpreter teardown would garbage-collect torch's and open_clip's module graphs (about 1 s
    # on a busy CPU); nothing there needs collecting before exit.
    gc.disable()
    gc.freeze()
    if not finished:
        # A frame (or a model load) is still inside torch: waiting could take seconds, and
        # interpreter teardown under a running op can crash. Nothing is left to save: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == '__main__':
    main()
