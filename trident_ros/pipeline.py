"""The pipeline: a registered method's image side and the shared vocabulary side, split so a vocabulary relabels
the last frame cheaply.

``encode_image`` runs the method's image encoders once per frame (:meth:`~trident_ros.methods.base.Method.encode_image`)
and keeps its features; ``encode_vocabulary`` turns a vocabulary into text features (cached per name); ``label``
combines the two without running any image encoder: the method's class scores (PAMR, area threshold and logit scale
shared), its optional refinement, its labels, then the per-class masks. Which method runs is ``config.method``,
looked up in the registry (:mod:`trident_ros.methods`); the pipeline never names one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from trident_ros import methods
from trident_ros.config import MODEL_FIELDS, ConfigError, TridentConfig
from trident_ros.labelling import Segmentation, class_masks, class_probabilities
from trident_ros.methods.base import Frame, Labelling, Method, MethodFeatures
from trident_ros.models import TridentModels, load_models
from trident_ros.runtime.onnx_runtime import OnnxGraphs, load_graphs
from trident_ros.stages.pamr import pamr_affinity, pamr_refine
from trident_ros.vocabulary import TextFeatureCache, Vocabulary, encode_vocabulary, parse_vocabulary

logger = logging.getLogger(__name__)

__all__ = ['MODEL_FIELDS', 'ImageFeatures', 'TridentPipeline', 'drop_small_classes', 'mean_absolute_difference']


@dataclass
class ImageFeatures:
    """The image side of one frame: the method's own features and what every method's labelling shares.

    Attributes:
        method: the method's features dataclass (:class:`~trident_ros.methods.base.MethodFeatures` or a subclass).
        original_size: (H, W) of the input image; outputs are at this size.
        timings: seconds per image-side stage.
        image: (H, W, 3) uint8 copy of the input, kept when ``labelling.pamr`` is on (its affinity).
    """

    method: MethodFeatures
    original_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)
    image: np.ndarray | None = None

    @property
    def dense(self) -> torch.Tensor:
        """``(E, hs, ws)`` L2-normalised dense features on the method's token grid."""
        return self.method.dense


def crop_multiple(method: Method, models: TridentModels) -> int:
    """Pixels a crop of ``method`` must be a multiple of: the least common multiple of the patch sizes of its
    window models (e.g. 16 for CLIP ViT-B/16 with DINO ViT-B/8, 14 for CLIP ViT-H/14 alone).
    """
    return math.lcm(*(getattr(models, name).patch_size for name in method.window_models))


class TridentPipeline:
    """A method on loaded models. Thread-compatible (one caller at a time), not thread-safe."""

    def __init__(self, config: TridentConfig, models: TridentModels | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        """Load the models (unless given) and, with ``models.backend: onnxruntime``, the method's graphs (exported
        and their engines built where missing; each step told to ``progress``).
        """
        config.validate()
        self.method = methods.get(config.method)
        self.models = models if models is not None else load_models(config)
        missing = [name for name in self.method.models if name not in self.models.loaded]
        if missing:
            raise ConfigError(f'method={config.method!r} needs {", ".join(missing)}, which these models lack')
        self.crop_multiple = crop_multiple(self.method, self.models)
        self._check_crop(config)
        self.config = config
        self.graphs: OnnxGraphs | None = None
        if config.models.backend == 'onnxruntime':
            self.graphs = load_graphs(config, self.method, self.models, progress)
        self.text_cache = TextFeatureCache(self.models.clip.model, self.models.tokenizer, self.models.device,
                                           self.models.dtype, config.labelling.text_cache_size)
        self.image_encoder_calls = 0
        self.image_side_reuses = 0
        self._last_encoded: tuple[np.ndarray, TridentConfig, ImageFeatures] | None = None

    def _check_crop(self, config: TridentConfig) -> None:
        """Raise :class:`ConfigError` unless the method's crop is a multiple of its window models' patch sizes."""
        name = self.method.crop_field
        crop = config.flat()[name]
        if crop % self.crop_multiple:
            patches = ', '.join(f'{model} /{getattr(self.models, model).patch_size}'
                                for model in self.method.window_models)
            raise ConfigError(f'{name}={crop}: must be a multiple of {self.crop_multiple}, the patch size of the '
                              f'loaded models ({patches})')

    def describe(self) -> str:
        """Which weights, device and dtype are in use (one line, for logs)."""
        return self.models.describe()

    def apply_label_config(self, config: TridentConfig) -> list[str]:
        """Adopt every dotted name of ``config`` that needs no model reload, at once.

        Returns the changed dotted names that DO need a reload (:data:`~trident_ros.config.MODEL_FIELDS`; those
        are not applied). When ``config`` names another method, only the names it was given apply: values its
        method's preset brought wait for that method (the next pipeline).

        Raises:
            ConfigError: the new crop does not fit the loaded models' patch sizes (nothing is applied).
        """
        config.validate()
        old, new = self.config.flat(), config.flat()
        changed = [name for name in new if new[name] != old.get(name)]
        reload = [name for name in changed if name in MODEL_FIELDS]
        other_method = 'method' in changed
        live = {name: new[name] for name in changed
                if name not in MODEL_FIELDS and (name in config.given or not other_method)}
        if live:
            adopted = self.config.replace(live)
            self._check_crop(adopted)
            self.config = adopted
        return reload

    @contextlib.contextmanager
    def _stage(self, timings: dict[str, float], name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.models.device.type == 'cuda':
            torch.cuda.synchronize(self.models.device)
        timings[name] = time.perf_counter() - start

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        """Run the image encoders of ``config.method`` on one frame.

        With ``windows.reuse_threshold`` > 0, a frame of the same size as the last encoded one, under the
        same configuration, whose mean absolute difference from it (grey levels over all pixels and
        channels) is at most the threshold gets the last encoded frame's image side instead (its
        timings: ``reuse_check`` only; ``image_side_reuses`` counts these). The comparison is with
        the last *encoded* frame, so a slow drift is encoded once it adds up to the threshold.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            ImageFeatures with the method's features (``dense`` (E, hs, ws) on its token grid).
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'expected an (H, W, 3) uint8 RGB array, got {getattr(image, "shape", None)} '
                             f'{getattr(image, "dtype", type(image).__name__)}')
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f'empty image {image.shape}')
        threshold = self.config.windows.reuse_threshold
        if threshold > 0 and self._last_encoded is not None:
            start = time.perf_counter()
            last_image, last_config, last_features = self._last_encoded
            if (last_config == self.config and last_image.shape == image.shape
                    and mean_absolute_difference(image, last_image) <= threshold):
                self.image_side_reuses += 1
                return dataclasses.replace(last_features, timings={'reuse_check': time.perf_counter() - start})
        timings: dict[str, float] = {}
        self.image_encoder_calls += 1
        with torch.inference_mode():
            frame = Frame(image=image, config=self.config, models=self.models,
                          stage=lambda name: self._stage(timings, name), patch=self.crop_multiple, timings=timings,
                          graphs=self.graphs)
            features = ImageFeatures(method=self.method.encode_image(frame), original_size=image.shape[:2],
                                     timings=timings)
        if self.config.labelling.pamr:
            features.image = image.copy()
        self._last_encoded = (image.copy(), self.config, features) if threshold > 0 else None
        return features

    def encode_vocabulary(self, vocabulary: str | Sequence[Sequence[str]]) -> Vocabulary:
        """Text features for a vocabulary: ``"sofa; couch, door"`` or ``[['sofa', 'couch'], ['door']]``.

        Only names not already cached are encoded. Raises ``VocabularyError`` for an unusable
        vocabulary; the returned Vocabulary's ``warnings`` say what was dropped or truncated.
        """
        with torch.inference_mode():
            if isinstance(vocabulary, str):
                parsed = parse_vocabulary(vocabulary, max_classes=self.config.labelling.max_classes)
            else:
                parsed = parse_vocabulary(', '.join('; '.join(names) for names in vocabulary),
                                          max_classes=self.config.labelling.max_classes)
            result = encode_vocabulary(parsed.classes, self.text_cache)
            result.warnings = list(parsed.warnings) + list(result.warnings)
            return result

    @torch.inference_mode()
    def label(self, features: ImageFeatures, vocabulary: Vocabulary) -> Segmentation:
        """Label a frame's cached image features with a vocabulary (no image encoder runs).

        The method's class scores (ResCLIP's second pass runs here, on cached inputs), with PAMR
        (``labelling.pamr``) and the area threshold shared; its refinement (SAM refinement for ``trident``) and
        its labels (CLIPtrase's cluster vote); then the per-class masks.
        """
        labelling = self.config.labelling
        timings: dict[str, float] = {}
        logit_filter = None
        if labelling.pamr and features.image is not None:
            with self._stage(timings, 'pamr_affinity'):
                pixels = torch.from_numpy(features.image).to(features.dense.device).permute(2, 0, 1)[None].float()
                affinity = pamr_affinity(pixels)

            def logit_filter(logits: torch.Tensor) -> torch.Tensor:
                return pamr_refine(logits[None], affinity)[0]
        elif labelling.pamr:
            logger.warning('pamr is on but this frame was encoded without it: PAMR applies from the next frame')

        def probabilities(dense: torch.Tensor) -> torch.Tensor:
            with self._stage(timings, 'labelling'):
                probs = class_probabilities(dense, vocabulary, features.original_size, labelling.logit_scale,
                                            logit_filter)
                return drop_small_classes(probs, labelling.area_thd) if labelling.area_thd > 0 else probs

        context = Labelling(config=self.config, models=self.models, stage=lambda name: self._stage(timings, name),
                            original_size=features.original_size, probabilities=probabilities, graphs=self.graphs)
        probs = self.method.class_scores(features.method, vocabulary, context)
        probs, refined = self.method.refine(probs, features.method, context)
        with self._stage(timings, 'masks'):
            labels, confidence = self.method.label(probs, features.method, refined, context)
            masks = class_masks(labels, confidence, vocabulary.names)
        return Segmentation(labels=labels, confidence=confidence, masks=masks, vocabulary=list(vocabulary.names),
                            timings={**features.timings, **timings})

    def segment(self, image: np.ndarray, vocabulary: str | Vocabulary) -> Segmentation:
        """Both sides in one call: encode ``image``, then label it with ``vocabulary``."""
        if isinstance(vocabulary, str):
            vocabulary = self.encode_vocabulary(vocabulary)
        return self.label(self.encode_image(image), vocabulary)


def drop_small_classes(probs: torch.Tensor, area_thd: float) -> torch.Tensor:
    """SCLIP's area threshold: zero the probabilities of every class that is the argmax of at most
    ``area_thd`` of the pixels (``clip_segmentor.py`` postprocess_result, without a background class).

    Args:
        probs: ``(K, H, W)`` class probabilities.
        area_thd: fraction of the pixels.

    Returns:
        ``(K, H, W)``: ``probs`` with the small classes zeroed (in place).
    """
    area = torch.bincount(probs.argmax(dim=0).reshape(-1), minlength=probs.shape[0])
    probs[area <= area_thd * area.sum()] = 0
    return probs


def mean_absolute_difference(first: np.ndarray, second: np.ndarray) -> float:
    """Mean of ``|first - second|`` over every element of two same-shape uint8 arrays (grey levels)."""
    return cv2.norm(first, second, cv2.NORM_L1) / first.size
