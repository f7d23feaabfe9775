"""The ``trident`` lifecycle node (a thin ROS 2 adapter over :class:`trident_ros.pipeline.TridentPipeline`).

* configure loads the models, encodes ``vocabulary`` and opens the vocabulary topics (:mod:`.vocabulary_topics`)
  until cleanup; activate opens the camera and the outputs (:mod:`.frame_io`) until deactivate; cleanup drops
  the models. A failed transition returns FAILURE with the reason; the process (:mod:`.main`) stays up;
* the image callback offers the newest frame to ONE frame worker thread (:mod:`.frame_worker`);
* a vocabulary (topic or parameter): receive → parse (cheap; refused with a reason) → parameter
  ``vocabulary`` → the vocabulary thread (:mod:`.vocabulary_worker`; a newer one supersedes it)
  → in use → the last frame relabelled from its cached image features → published;
* parameters (dotted names): :mod:`.parameters`, callbacks per distro :mod:`.compat`; fields that need
  no reload apply at once (one relabel per batch), ``config.MODEL_FIELDS`` at the next configure, where
  the method's preset fills in the names not given and the node writes what runs into its parameters;
* nothing received can take the node down (docs/reliability.md): bad input is refused with a
  throttled warning and the last good state stays; :mod:`.health` counts it for /diagnostics.
"""
from __future__ import annotations

import dataclasses
import queue
import time
from types import MappingProxyType
from typing import Any

import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from std_msgs.msg import Header, String

from trident_ros.config import MODEL_FIELDS, ConfigError, TridentConfig
from trident_ros.models.weights import WeightsError
from trident_ros.pipeline import TridentPipeline
from trident_ros.ros import conversions
from trident_ros.ros.compat import PRE_POST_SET_CALLBACKS, add_parameter_callbacks
from trident_ros.ros.frame_io import FramePath, Snapshot
from trident_ros.ros.health import NodeHealth, depth_values, idle_reason, message_kind, pipeline_values
from trident_ros.ros.parameters import (
    check_changes,
    coerce_parameters,
    config_from_values,
    config_specs,
    declare_parameters,
    parameter_defaults,
)
from trident_ros.ros.vocabulary_topics import VocabularyTopics
from trident_ros.ros.vocabulary_worker import VocabularyEncoder, VocabularyRequest
from trident_ros.vocabulary import Vocabulary, VocabularyError, parse_vocabulary


class TridentNode(LifecycleNode):
    """Lifecycle node ``trident`` (``config/trident.yaml``); ``pre_post_set_callbacks``: :mod:`.compat`.

    One owner of node state: the control callbacks (parameters, lifecycle, ``~/vocabulary``, vocabulary results
    handed back by the vocabulary thread) all run in the node's default callback group, which is mutually
    exclusive, and none of them waits for a frame.
    """

    def __init__(self, pre_post_set_callbacks: bool = PRE_POST_SET_CALLBACKS, **kwargs: Any) -> None:
        super().__init__('trident', **kwargs)
        # parameter -> why its start value is unusable; the config names given (at start, or set by a user since)
        self._specs = config_specs()  # the config's dotted names declared here (plug-ins registered by now)
        self._bad_overrides, self._given = declare_parameters(self)
        self._writing_back = False  # the node itself writes the values that run into the parameters
        # as applied; read from here, not get_parameter: on Humble they are applied before rclpy stores them
        self._now = Snapshot(MappingProxyType({name: self.get_parameter(name).value for name in parameter_defaults()}))
        self._health = NodeHealth(self.get_logger())
        self._state = 'unconfigured'
        self._engine_build = ''  # models.backend onnxruntime: the graph export/engine build step under way
        self._vocabulary_topics: VocabularyTopics | None = None
        self._frames = FramePath(self, lambda: self._now, self._health)
        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._diag_timer = self.create_timer(1.0, self._publish_diagnostics,
                                             callback_group=MutuallyExclusiveCallbackGroup())
        add_parameter_callbacks(self, coerce_parameters, self._validate_parameters, self._apply_parameters,
                                pre_post_set_callbacks)
        # the vocabulary thread hands its results back here; the node takes them in its default group
        self._vocabulary_results: queue.SimpleQueue[tuple[VocabularyRequest, Vocabulary | Exception]] = \
            queue.SimpleQueue()
        self._vocabulary_done = self.create_guard_condition(self._take_vocabulary_results)
        self._encoder = VocabularyEncoder(self._hand_back, self._hand_back)
        self.get_logger().info(f'ready (unconfigured); image decoding: {conversions.IMAGE_BACKEND}')

    @property
    def running_config(self) -> TridentConfig | None:
        """The configuration frames run (None: unconfigured); the parameters show its values.

        At configure it is the new pipeline's ``config``; changes that apply at once replace it here and the
        frame worker hands it to the pipeline at its next job.
        """
        return self._now.config

    def _update(self, **changes: Any) -> None:
        """Swap in a new snapshot with ``changes`` (control callbacks only)."""
        self._now = dataclasses.replace(self._now, **changes)

    # ------------------------------------------------------------------ parameters
    def _validate_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Refuse invalid values with a reason (cheap checks only); the old values stay."""
        now = self._now
        changes = {p.name: p.value for p in parameters if p.name in now.values}
        if not changes or self._writing_back:
            return SetParametersResult(successful=True)
        try:
            check_changes(now.values, self._given, now.config, now.pipeline, changes)
        except (ConfigError, VocabularyError, ValueError) as error:
            if 'vocabulary' in changes:
                self._health.counters.add('vocabularies_refused')
            self._health.warn(f'parameter:{message_kind(error)}', f'parameter change refused: {error}')
            return SetParametersResult(successful=False, reason=str(error))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, parameters: list[Parameter]) -> None:
        """Act on the values that changed (a value set to what it was changes nothing, silently).

        A config name set by a user becomes given (kept at the next configure, whatever the method); the
        node's own write-back of the values that run changes the parameters only.
        """
        values, changed = dict(self._now.values), set()
        for param in parameters:
            if param.name in self._bad_overrides:
                self._bad_overrides.pop(param.name)  # set again, with a value that passed validation
                changed.add(param.name)
            if param.name in values and param.value != values[param.name]:
                values[param.name] = param.value
                changed.add(param.name)
        self._update(values=MappingProxyType(values))
        if self._writing_back:
            return
        self._given |= {param.name for param in parameters if param.name in self._specs}
        live = sorted(name for name in changed & self._specs.keys() if name not in MODEL_FIELDS)
        reload = sorted(name for name in changed if name in MODEL_FIELDS)
        if live and self._now.config is not None:  # the running configuration: no reload field, no preset
            self._update(config=self._now.config.replace({name: values[name] for name in live}))
        if live:
            self.get_logger().info(f'applied at once: {", ".join(live)}')
            if 'labelling.prob_thd' in live:
                self._publish_vocabulary_info()  # LabelInfo.threshold
            self._frames.worker.request_relabel()
        if reload:
            self.get_logger().info(f'{", ".join(reload)} take(s) effect at the next configure '
                                   '(ros2 lifecycle set <node> deactivate, cleanup, configure, activate)')
        if 'vocabulary' in changed:
            self._request_vocabulary(values['vocabulary'])
        self._frames.parameters_changed(changed)

    # ------------------------------------------------------------------ vocabulary
    def _on_vocabulary(self, msg: String) -> None:
        """~/vocabulary: parse (refused with a reason) and set the ``vocabulary`` parameter."""
        text, values = msg.data, self._now.values
        if text == values['vocabulary']:
            return  # a latched publisher reaches both subscriptions; the same text changes nothing
        try:
            parse_vocabulary(text, max_classes=values['labelling.max_classes'])
        except VocabularyError as error:
            self._health.counters.add('vocabularies_refused')
            self._health.warn(f'vocabulary:{message_kind(error)}',
                              f'vocabulary from ~/vocabulary refused, keeping the last good one: {error}')
            return
        result = self.set_parameters([Parameter('vocabulary', Parameter.Type.STRING, text)])[0]
        if not result.successful:
            self._health.warn(f'vocabulary:{message_kind(result.reason)}',
                              f'vocabulary from ~/vocabulary refused, keeping the last good one: {result.reason}')

    def _request_vocabulary(self, text: str) -> None:
        """Hand a parsed vocabulary to the vocabulary thread (models loaded) or keep it for configure."""
        now = self._now
        if now.pipeline is None:
            self.get_logger().info(f'vocabulary {text[:80]!r} stored; it is encoded at configure')
        elif text == now.vocabulary_text:
            self._encoder.cancel()  # back to the vocabulary in use: nothing to encode
        else:
            self._encoder.submit(text, now.pipeline)

    def _hand_back(self, request: VocabularyRequest, result: Vocabulary | Exception) -> None:
        """Vocabulary thread: queue its result for the node (:meth:`_take_vocabulary_results`); nothing else."""
        self._vocabulary_results.put((request, result))
        self._vocabulary_done.trigger()

    def _take_vocabulary_results(self) -> None:
        """The vocabularies the thread encoded (or could not) since the last call, in order.

        A result of models dropped since is discarded; a failure resets the ``vocabulary`` parameter to the
        text in use only while it still names the failed text.
        """
        while not self._vocabulary_results.empty():
            request, result = self._vocabulary_results.get()
            if request.pipeline is not self._now.pipeline:
                continue  # encoded by models dropped since
            if isinstance(result, Vocabulary):
                self._use_vocabulary(request.text, result)
                continue
            self._health.counters.add('vocabularies_refused')
            self._health.warn(f'vocabulary:{type(result).__name__}', f'vocabulary {request.text[:80]!r} could not '
                              f'be encoded, keeping the last good one: {type(result).__name__}: {result}')
            if self._now.vocabulary_text and self._now.values['vocabulary'] == request.text:
                self.set_parameters([Parameter('vocabulary', Parameter.Type.STRING, self._now.vocabulary_text)])

    def _use_vocabulary(self, text: str, vocabulary: Vocabulary) -> None:
        self._update(vocabulary=vocabulary, vocabulary_text=text)
        for warning in vocabulary.warnings:
            self.get_logger().warning(f'vocabulary: {warning}')
        self.get_logger().info(f'vocabulary: {vocabulary.num_classes} classes '
                               f'({", ".join(vocabulary.names[:8])}{", ..." if vocabulary.num_classes > 8 else ""})')
        if vocabulary.num_classes > 255:
            self._health.warn('labels:mono16', f'{vocabulary.num_classes} classes: ~/labels is mono16, which Nav2\'s '
                              'semantic_segmentation_layer cannot read (it needs <= 255 classes, mono8)')
        self._publish_vocabulary_info()
        self._frames.worker.request_relabel()

    def _publish_vocabulary_info(self) -> None:
        now = self._now
        if self._vocabulary_topics is not None and now.vocabulary is not None:
            self._vocabulary_topics.publish(now.vocabulary, now.values['labelling.prob_thd'])

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            if self._bad_overrides:
                raise ConfigError('; '.join(self._bad_overrides.values()))
            config = config_from_values(self._now.values, self._given)
            self.get_logger().info('loading models ...')
            self._engine_build = ''
            pipeline = TridentPipeline(config, progress=self._engine_progress)
        except (ConfigError, WeightsError) as error:
            return self._fail_configure(str(error))
        except Exception as error:  # anything else the model libraries raise: still a clean FAILURE
            return self._fail_configure(f'{type(error).__name__}: {error}')
        self._update(pipeline=pipeline, config=pipeline.config)
        self._write_back(pipeline.config)
        self._health.clear_error()
        self.get_logger().info(pipeline.describe())
        if conversions.VISION_MSGS_MISSING:  # no ~/label_info (here) and no ~/detections_3d (DepthIO)
            self.get_logger().warning(conversions.VISION_MSGS_MISSING, once=True)
        self._vocabulary_topics = VocabularyTopics(self, self._on_vocabulary)
        text = self._now.values['vocabulary']
        if text:
            try:
                self._use_vocabulary(text, pipeline.encode_vocabulary(text))
            except Exception as error:  # VocabularyError, or the text encoder failing: models stay usable
                self._health.warn(f'vocabulary:{message_kind(error)}',
                                  f'vocabulary {text[:80]!r} refused: {error}; send one on ~/vocabulary')
        self._state = 'inactive'
        return TransitionCallbackReturn.SUCCESS

    def _engine_progress(self, message: str) -> None:
        """A step of the graphs' export and engine build at configure: in the log and on /diagnostics."""
        self._engine_build = message
        self.get_logger().info(message)

    def _write_back(self, config: TridentConfig) -> None:
        """Make the parameters show what runs (the preset's values of names not given): not given by this."""
        values = self._now.values
        differ = [Parameter(name, value=value) for name, value in config.flat().items()
                  if name in values and values[name] != value]
        if not differ:
            return
        self._writing_back = True
        try:
            refused = [f'{p.name}: {r.reason}' for p, r in zip(differ, self.set_parameters(differ), strict=True)
                       if not r.successful]
        finally:
            self._writing_back = False
        if refused:
            self.get_logger().warning(f'parameters that do not show what runs: {"; ".join(refused)}')

    def _fail_configure(self, reason: str) -> TransitionCallbackReturn:
        self._health.error(f'configure failed: {reason}', log=False)
        self.get_logger().error(f'configure failed: {reason}')
        return TransitionCallbackReturn.FAILURE

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._frames.open()
        except Exception as error:  # e.g. an invalid qos_overrides value: a clean FAILURE, still inactive
            self._frames.close()
            self._health.error(f'activate failed: {error}', log=False)
            self.get_logger().error(f'activate failed: {error}')
            return TransitionCallbackReturn.FAILURE
        self._update(active=True)
        self._state = 'active'
        self.get_logger().info('active')
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._update(active=False)
        self._frames.close()
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
        self._update(active=False)
        self._frames.close()
        self._remove_vocabulary_io()
        self._drop_models()
        self._state = state

    def _drop_models(self) -> None:
        """Forget the models (a frame in flight ends on its own snapshot, then the worker lets go of them)."""
        self._encoder.cancel()
        self._update(pipeline=None, config=None, vocabulary=None, vocabulary_text='')
        self._frames.forget_last()
        self._free_gpu_cache()

    @staticmethod
    def _free_gpu_cache() -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ I/O set-up
    def _remove_vocabulary_io(self) -> None:
        if self._vocabulary_topics is not None:
            self._vocabulary_topics.destroy()
            self._vocabulary_topics = None

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        status = self.diagnostic_status()
        self._diag_pub.publish(DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[status]))

    def diagnostic_status(self) -> DiagnosticStatus:
        """The node's health: OK, WARN (recent bad input, no vocabulary, not active) or ERROR."""
        now, pending = self._now, self._encoder.pending()
        vocabulary = now.vocabulary
        values = {**pipeline_values(now.pipeline, vocabulary, pending), 'image_decoder': conversions.IMAGE_BACKEND,
                  **depth_values(self._frames.depth_counts), 'engine_build': self._engine_build}
        return self._health.status(f'{self.get_fully_qualified_name()}: segmentation', self._state, values,
                                   idle_reason(self._state, vocabulary, pending))

    # ------------------------------------------------------------------ shutdown
    def stop_worker(self, timeout: float) -> bool:
        """Ask the frame worker and the vocabulary thread to stop; True if both ended within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        worker_stopped = self._frames.worker.stop(timeout)
        return self._encoder.stop(max(0.0, deadline - time.monotonic())) and worker_stopped

