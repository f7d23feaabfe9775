"""The frame worker: ONE thread labelling the newest frame, or relabelling the last one.

Frames are offered as they arrive; one replaced before the worker took it is dropped (the caller
counts it), never queued. A relabel request waits RELABEL_SETTLE_S for more requests of the same
batch (e.g. ``ros2 param load``), so a batch of changes relabels once; a new frame makes a
pending relabel unnecessary (it is labelled with everything in use). Pure Python: no ROS.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

RELABEL_SETTLE_S = 0.05


@dataclass
class Frame:
    """A received image message and when it arrived (time.monotonic())."""

    msg: Any
    received: float


class FrameWorker:
    """One thread calling ``process(frame)`` for the newest frame, ``relabel()`` when requested.

    Args:
        process: labels and publishes one frame.
        relabel: relabels and publishes the last frame.
        on_failure: told what ``process`` or ``relabel`` raised; the worker goes on (and frees the
            CUDA cache afterwards).
    """

    def __init__(self, process: Callable[[Frame], None], relabel: Callable[[], None],
                 on_failure: Callable[[Exception], None]) -> None:
        self._process = process
        self._relabel = relabel
        self._on_failure = on_failure
        self._work = threading.Condition()  # guards _pending, _relabel_at, _stopping
        self._pending: Frame | None = None
        self._relabel_at: float | None = None  # time.monotonic() after which the last frame is relabelled
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name='trident_worker', daemon=True)
        self._thread.start()

    def offer(self, msg: Any) -> bool:
        """Make ``msg`` the next frame; True if it replaced one the worker had not taken (dropped)."""
        with self._work:
            dropped = self._pending is not None
            self._pending = Frame(msg, time.monotonic())
            self._work.notify()
        return dropped

    def request_relabel(self) -> None:
        """Relabel the last frame once the changes of this batch are in (RELABEL_SETTLE_S)."""
        with self._work:
            self._relabel_at = time.monotonic() + RELABEL_SETTLE_S
            self._work.notify()

    def clear(self) -> None:
        """Forget the frame and the relabel not started yet."""
        with self._work:
            self._pending, self._relabel_at = None, None

    def stop(self, timeout: float) -> bool:
        """Ask the thread to stop; True if it ended within ``timeout`` seconds."""
        with self._work:
            self._stopping = True
            self._work.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next_job(self) -> Frame | bool | None:
        """Wait for a frame (returned) or a due relabel (True); None when stopping."""
        with self._work:
            while not self._stopping:
                if self._pending is not None:
                    frame, self._pending, self._relabel_at = self._pending, None, None
                    return frame
                wait = None if self._relabel_at is None else self._relabel_at - time.monotonic()
                if wait is not None and wait <= 0:
                    self._relabel_at = None
                    return True
                self._work.wait(wait)
            return None

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            failed = False
            try:
                if isinstance(job, Frame):
                    self._process(job)
                else:
                    self._relabel()
            except Exception as error:  # the worker must survive anything a frame can cause
                failed = True
                self._on_failure(error)
            if failed and torch.cuda.is_available():
                # Outside the except block: the traceback (and the tensors its frames hold) is gone
                # now, so the allocator can really give their memory back.
                torch.cuda.empty_cache()
