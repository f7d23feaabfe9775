"""The trident node's health: counters, throttled warnings, the last error and its diagnostic status."""
from __future__ import annotations

import collections
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from trident_ros.pipeline import TridentPipeline
from trident_ros.ros.depth_io import DepthCounts
from trident_ros.ros.vocabulary_worker import VocabularyRequest
from trident_ros.vocabulary import Vocabulary

RECENT_S = 10.0  # how long a warning or error keeps the diagnostics status raised
WARN_EVERY_S = 5.0  # log the same kind of warning at most this often
MAX_WARNING_KINDS = 64  # kinds remembered for throttling (older ones are forgotten)


class Counters:
    """What happened to the frames and vocabularies received since the node started (thread-safe).

    Counted from the image callback, the frame worker and the node's control callbacks at once, so
    every change goes through :meth:`add` under one lock (``+=`` on a shared int loses counts).
    """

    NAMES = ('received', 'processed', 'relabelled', 'dropped', 'rejected', 'failed', 'skipped_no_subscribers',
             'vocabularies_refused')

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, count: int = 1) -> None:
        """Count ``count`` more of ``name`` (one of :data:`NAMES`)."""
        with self._lock:
            self._values[name] += count

    def values(self) -> dict[str, int]:
        """A consistent copy: name -> count."""
        with self._lock:
            return dict(self._values)


@dataclass
class Latency:
    """The last published frame: its ``frame_id``, stamp (``sec.nanosec``) and timings (ms)."""

    frame_id: str = ''
    stamp: str = ''
    milliseconds: dict[str, float] = field(default_factory=dict)


def message_kind(error: Exception | str) -> str:
    """A short key of an error message without its quoted text and numbers.

    Warnings about the same problem with different values are throttled together.
    """
    return re.sub(r"'[^']*'|\d+", '', str(error))[:48]


def pipeline_values(pipeline: TridentPipeline | None, vocabulary: Vocabulary | None,
                    pending: VocabularyRequest | None) -> dict[str, Any]:
    """Diagnostic values of the models (device, encoder calls, GPU memory) and the vocabularies.

    ``vocabulary_pending`` is the text being encoded (its start), ``vocabulary_pending_names`` its
    progress (names done / total); both empty when none is.
    """
    values: dict[str, Any] = {
        'device': str(pipeline.models.device) if pipeline is not None else 'none',
        'image_encoder_calls': pipeline.image_encoder_calls if pipeline is not None else 0,
        'image_side_reuses': pipeline.image_side_reuses if pipeline is not None else 0,
        'vocabulary_size': vocabulary.num_classes if vocabulary is not None else 0,
        'vocabulary_pending': pending.text[:200] if pending is not None else '',
        'vocabulary_pending_names': f'{pending.names_done}/{pending.names_total}' if pending is not None else '',
    }
    if pipeline is not None and pipeline.models.device.type == 'cuda':
        device = pipeline.models.device
        values['gpu_memory_allocated_mb'] = f'{torch.cuda.memory_allocated(device) / 2**20:.1f}'
        values['gpu_memory_reserved_mb'] = f'{torch.cuda.memory_reserved(device) / 2**20:.1f}'
    return values


def idle_reason(state: str, vocabulary: Vocabulary | None, pending: VocabularyRequest | None) -> str | None:
    """Why the node processes nothing (not active, no vocabulary yet), or None."""
    if state != 'active':
        return f'{state}: not processing'
    if vocabulary is None:
        return 'no vocabulary' + (' yet: one is being encoded' if pending else '')
    return None


def depth_values(counts: DepthCounts) -> dict[str, int]:
    """Diagnostic values of the frames by what their depth gave."""
    return {'depth_frames_3d': counts.with_3d, 'depth_frames_2d_only': counts.no_matching_depth,
            'depth_frames_foreign_frame': counts.foreign_frame, 'depth_refused': counts.refused}


class NodeHealth:
    """Counters, throttled warnings and errors of one node, and its ``DiagnosticStatus``.

    Thread-safe: warnings, errors and frames are reported from several threads at once.

    Args:
        logger: the node's logger (``warning``/``error`` methods).
    """

    def __init__(self, logger: Any) -> None:
        self.counters = Counters()
        self.latency = Latency()
        self._logger = logger
        self._done: collections.deque[float] = collections.deque(maxlen=256)  # when frames were published
        self._warned: dict[str, float] = {}  # warning kind -> when it was last logged
        self._warning: tuple[float, str] | None = None
        self._error: tuple[float, str] | None = None
        self._error_published = False  # the current error went out on /diagnostics at least once
        self._lock = threading.Lock()  # guards everything above but the logger

    def warn(self, kind: str, message: str) -> None:
        """A warning in the log (at most one per ``kind`` every WARN_EVERY_S) and in diagnostics."""
        now = time.monotonic()
        with self._lock:
            self._warning = (now, message)
            log = now - self._warned.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S
            if log:
                if len(self._warned) >= MAX_WARNING_KINDS:
                    self._warned = {k: t for k, t in self._warned.items() if now - t < WARN_EVERY_S}
                self._warned[kind] = now
        if log:
            self._logger.warning(message)

    def error(self, message: str, log: bool = True) -> None:
        """An error: ERROR on /diagnostics for RECENT_S (and in the log, throttled, if ``log``)."""
        with self._lock:
            self._error = (time.monotonic(), message)
            self._error_published = False
        if log:
            self._logger.error(message, throttle_duration_sec=5.0)

    def clear_error(self) -> None:
        """Forget the last error (e.g. a failed configure, once a configure succeeds)."""
        with self._lock:
            self._error = None

    def frame_published(self, frame_id: str, stamp: str, seconds: dict[str, float]) -> None:
        """A frame's outputs went out: its latencies (``seconds`` per stage) and when."""
        latency = Latency(frame_id, stamp, {name: round(s * 1000.0, 2) for name, s in seconds.items()})
        with self._lock:
            self.latency = latency
            self._done.append(time.monotonic())

    def frame_succeeded(self) -> None:
        """A new frame went through: an earlier frame error that was on /diagnostics becomes a warning."""
        with self._lock:
            error = self._error
            if error is not None and error[1].startswith('frame skipped') and self._error_published:
                self._error = None
                self._warning = (error[0], f'recovered; earlier {error[1]}')

    def status(self, name: str, state: str, values: dict[str, Any], idle_reason: str | None) -> DiagnosticStatus:
        """The node's health: OK, WARN (a recent warning, ``idle_reason``) or ERROR (a recent error).

        Args:
            name: the status name (``<node>: segmentation``).
            state: the lifecycle state.
            values: node-specific key/values (device, vocabulary, ...), after the counters.
            idle_reason: why nothing is processed (not active, no vocabulary), or None.

        Returns:
            The status; ``hardware_id`` is ``values['device']``.
        """
        now = time.monotonic()
        with self._lock:
            level, message = DiagnosticStatus.OK, 'processing'
            if self._error is not None and now - self._error[0] < RECENT_S:
                level, message = DiagnosticStatus.ERROR, self._error[1]
            elif self._warning is not None and now - self._warning[0] < RECENT_S:
                level, message = DiagnosticStatus.WARN, self._warning[1]
            elif idle_reason is not None:
                level, message = DiagnosticStatus.WARN, idle_reason
            self._error_published = level == DiagnosticStatus.ERROR
            recent = [t for t in self._done if now - t < RECENT_S]
            latency = self.latency
        counts = self.counters.values()
        all_values = {
            'lifecycle_state': state,
            'processing_rate_hz': f'{len(recent) / RECENT_S:.2f}',
            **{('' if name == 'vocabularies_refused' else 'frames_') + name: count for name, count in counts.items()},
            **values,
        }
        if latency.milliseconds:  # which frame the latencies describe (frame_id and stamp of its header)
            all_values.update({'latency_frame_id': latency.frame_id, 'latency_frame_stamp': latency.stamp,
                               **{f'latency_ms.{k}': v for k, v in latency.milliseconds.items()}})
        device = str(values.get('device', 'none'))
        return DiagnosticStatus(level=level, name=name, message=message, hardware_id=device,
                                values=[KeyValue(key=k, value=str(v)) for k, v in all_values.items()])
