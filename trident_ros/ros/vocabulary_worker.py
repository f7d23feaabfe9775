"""Vocabularies encoded off the frame path: one thread, the newest request wins.

A request is parsed, then its names are encoded in chunks by the pipeline's text features cache
(:func:`trident_ros.vocabulary.encode_vocabulary`). A newer request supersedes one in progress at
its next chunk boundary; names already encoded stay cached, so going back to a vocabulary costs
little. Results are handed to a callback; what is in use is the caller's business.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trident_ros.pipeline import TridentPipeline
from trident_ros.vocabulary import EncodingCancelledError, Vocabulary, encode_vocabulary, parse_vocabulary

logger = logging.getLogger(__name__)

CHUNK_NAMES = 64
"""Names encoded between two looks at newer requests (64 names = 5120 prompts, one text batch)."""


@dataclass
class VocabularyRequest:
    """A vocabulary text to encode with ``pipeline``, and how far it got."""

    text: str
    pipeline: TridentPipeline
    names_done: int = 0
    names_total: int = 0
    superseded: bool = False


class VocabularyEncoder:
    """One thread encoding the newest submitted vocabulary.

    Args:
        on_ready: ``on_ready(request, vocabulary)`` once a request is encoded (not superseded).
        on_failed: ``on_failed(request, error)`` when it could not be (e.g. out of memory).
        chunk_names: names encoded between two looks at newer requests.
    """

    def __init__(self, on_ready: Callable[[VocabularyRequest, Vocabulary], None],
                 on_failed: Callable[[VocabularyRequest, Exception], None], chunk_names: int = CHUNK_NAMES) -> None:
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._chunk_names = chunk_names
        self._wake = threading.Condition()  # guards _queued, _current, _stopping
        self._queued: VocabularyRequest | None = None
        self._current: VocabularyRequest | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name='trident_vocabulary', daemon=True)
        self._thread.start()

    def submit(self, text: str, pipeline: TridentPipeline) -> None:
        """Encode ``text`` next; a request queued or in progress is superseded."""
        with self._wake:
            self._supersede()
            self._queued = VocabularyRequest(text, pipeline)
            self._wake.notify()

    def cancel(self) -> None:
        """Drop the queued request and stop the one in progress at its next chunk boundary."""
        with self._wake:
            self._supersede()

    def pending(self) -> VocabularyRequest | None:
        """The newest request not yet handed over (queued or in progress), or None."""
        with self._wake:
            return self._queued or (self._current if self._current and not self._current.superseded else None)

    def stop(self, timeout: float) -> bool:
        """Stop the thread; True if it ended within ``timeout`` seconds."""
        with self._wake:
            self._stopping = True
            self._supersede()
            self._wake.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _supersede(self) -> None:
        if self._current is not None:
            self._current.superseded = True
        self._queued = None

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._queued is not None):
                    self._wake.wait()
                if self._stopping:
                    return
                request, self._queued = self._queued, None
                self._current = request
            failure = None
            try:
                vocabulary = self._encode(request)
            except EncodingCancelledError:
                logger.info('vocabulary %r superseded after %d of %d names', request.text[:40], request.names_done,
                            request.names_total)
                vocabulary = None
            except Exception as error:  # any failure of the text encoder is the caller's to report
                failure, vocabulary = error, None
            with self._wake:
                superseded = request.superseded
                self._current = None
            if failure is not None:
                # Outside the except block: the traceback's tensors are gone, the cache can be freed.
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._on_failed(request, failure)
            elif vocabulary is not None and not superseded:
                self._on_ready(request, vocabulary)

    def _encode(self, request: VocabularyRequest) -> Vocabulary:
        parsed = parse_vocabulary(request.text, max_classes=request.pipeline.config.labelling.max_classes)
        request.names_total = sum(len(names) for names in parsed.classes)

        def progress(done: int, total: int) -> None:
            request.names_done = done

        with torch.inference_mode():
            vocabulary = encode_vocabulary(parsed.classes, request.pipeline.text_cache, self._chunk_names, progress,
                                           cancelled=lambda: request.superseded)
        vocabulary.warnings = list(parsed.warnings) + list(vocabulary.warnings)
        return vocabulary
