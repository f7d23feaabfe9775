"""The Trident pipeline: the stages in order, split into an image side and a vocabulary side.

``encode_image`` runs every image encoder once per frame and keeps what labelling needs;
``encode_vocabulary`` turns a vocabulary into text features (cached per name); ``label`` combines
the two without running any image encoder, so a new vocabulary relabels the last frame cheaply.

``config.method`` picks the image side (the other stages are shared):

* ``trident``: DINO-guided CLIP last block on ``slide_crop`` windows; splice; SAM encoder, whose
  last block's attention aggregates the spliced map onto SAM's token grid as the block computes
  it (:class:`.aggregation.SamAggregation`); projection; SAM refinement at labelling (``refine``).
* ``trident_fast``: the same without refinement.
* ``proxy``: the DINO-guided windows spliced and projected on the window token grid, no SAM
  (ProxyCLIP's attention rule: mean(S) per window, as ProxyCLIP runs one window at a time).
* ``maskclip``, ``sclip``, ``clearclip``, ``naclip``: one CLIP last-block rule per
  ``clip_slide_crop`` window (:mod:`trident_ros.stages.clip_attention`), features projected and L2-normalised per
  window, then spliced; no DINO, no SAM.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from trident_ros.config import (
    CLIP_BLOCK_METHODS,
    CLIP_ONLY_METHODS,
    METHOD_MODELS,
    PATCH_SIZE,
    ConfigError,
    TridentConfig,
)
from trident_ros.labelling import Segmentation, class_masks, class_probabilities, label_map
from trident_ros.methods.cliptrase import cliptrase_pass, cluster_map, cluster_vote
from trident_ros.methods.resclip import ResclipParams, ResclipWindows, resclip_first_pass, resclip_second_pass
from trident_ros.methods.scclip import scclip_features
from trident_ros.models import SamImage, TridentModels, load_models
from trident_ros.stages.clip_attention import clip_only_features
from trident_ros.stages.pamr import pamr_affinity, pamr_refine
from trident_ros.stages.sam_aggregation import SamAggregation
from trident_ros.stages.sam_refinement import RefinementParams, refine_with_sam
from trident_ros.stages.splice import splice_windows
from trident_ros.stages.windows import dino_guided_attention, resize_for_windows, window_boxes
from trident_ros.vocabulary import TextFeatureCache, Vocabulary, encode_vocabulary, parse_vocabulary

logger = logging.getLogger(__name__)

# Fields that change which models are loaded (or how): they need a new pipeline.
MODEL_FIELDS = frozenset({
    'method', 'clip_model', 'clip_pretrained', 'dino_model', 'dino_checkpoint', 'sam_model', 'sam_checkpoint',
    'weights_dir', 'download', 'random_weights', 'model_scale', 'device', 'fp16', 'bf16', 'text_cache_size'})


@dataclass
class ImageFeatures:
    """The image side of one frame: everything labelling and refinement need.

    Attributes:
        dense: (E, hs, ws) dense CLIP features: L2-normalised, on the SAM token grid (trident,
            trident_fast) or on the token grid of the resized image the windows were cut from
            (other methods; CLIP-only methods: the average of per-window unit features where
            windows overlap, so logits are the average of per-window logits).
        sam_image: SAM image embedding and sizes (for refinement); None unless the method is
            ``trident`` (the only one that refines).
        original_size: (H, W) of the input image; outputs are at this size.
        timings: seconds per image-side stage.
        clusters: ``cliptrase``: (H, W) int16 cluster of every pixel (None: no cluster found, or
            another method).
        resclip: ``resclip``: what the vocabulary-dependent second pass needs, per window.
        image: (H, W, 3) uint8 copy of the input, kept when ``pamr`` is on (its affinity).
    """

    dense: torch.Tensor
    sam_image: SamImage | None
    original_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)
    clusters: torch.Tensor | None = None
    resclip: ResclipFrame | None = None
    image: np.ndarray | None = None


@dataclass
class ResclipFrame:
    """ResCLIP's cached windows with where they go.

    Attributes:
        windows: the per-window cache of the first pass.
        boxes: window boxes in pixels of the resized image.
        token_grid: (Hg, Wg) of the spliced map.
    """

    windows: ResclipWindows
    boxes: list[tuple[int, int, int, int]]
    token_grid: tuple[int, int]


class TridentPipeline:
    """Trident on loaded models. Thread-compatible (one caller at a time), not thread-safe."""

    def __init__(self, config: TridentConfig, models: TridentModels | None = None) -> None:
        config.validate()
        self.config = config
        self.models = models if models is not None else load_models(config)
        missing = [name for name in METHOD_MODELS[config.method] if name not in self.models.loaded]
        if missing:
            raise ConfigError(f'method={config.method!r} needs {", ".join(missing)}, which these models lack')
        self.text_cache = TextFeatureCache(self.models.clip.model, self.models.tokenizer, self.models.device,
                                           self.models.dtype, config.text_cache_size)
        self.image_encoder_calls = 0
        self.image_side_reuses = 0
        self._last_encoded: tuple[np.ndarray, TridentConfig, ImageFeatures] | None = None

    def describe(self) -> str:
        """Which weights, device and dtype are in use (one line, for logs)."""
        return self.models.describe()

    def apply_label_config(self, config: TridentConfig) -> list[str]:
        """Adopt every field of ``config`` that needs no model reload, at once.

        Returns the names of changed fields that DO need a reload (those are not applied).
        """
        config.validate()
        changed = [f.name for f in dataclasses.fields(config)
                   if getattr(config, f.name) != getattr(self.config, f.name)]
        reload = [name for name in changed if name in MODEL_FIELDS]
        live = {name: getattr(config, name) for name in changed if name not in MODEL_FIELDS}
        if live:
            self.config = self.config.replace(**live)
        return reload

    @contextlib.contextmanager
    def _stage(self, timings: dict[str, float], name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.models.device.type == 'cuda':
            torch.cuda.synchronize(self.models.device)
        timings[name] = time.perf_counter() - start

    def windows(self, image: np.ndarray, crop: int,
                stride: int) -> tuple[torch.Tensor, list[tuple[int, int, int, int]], torch.Tensor]:
        """Cut the sliding windows of a frame, as every method's image side does.

        Args:
            image: (H, W, 3) uint8 RGB.
            crop: window side in pixels.
            stride: window step in pixels.

        Returns:
            The resized image (3, H', W'), its window boxes ``(y0, x0, y1, x1)`` and the crops
            (B, 3, crop, crop) float32 in [0, 1], on the models' device.
        """
        cfg, models = self.config, self.models
        rgb = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # on the CPU: cv2 rescales it
        whole = cfg.method == 'cliptrase' or (cfg.whole_image and cfg.method in CLIP_ONLY_METHODS + CLIP_BLOCK_METHODS)
        if whole:  # one window: the image
            resized = resize_for_windows(rgb, cfg.input_short_side, cfg.max_long_side, PATCH_SIZE, models.device)
            boxes = [(0, 0, resized.shape[1], resized.shape[2])]
        else:
            resized = resize_for_windows(rgb, cfg.input_short_side, cfg.max_long_side, crop, models.device)
            boxes = window_boxes(resized.shape[1], resized.shape[2], crop, stride)
        crops = torch.stack([resized[:, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes]).float().div_(255)
        return resized, boxes, crops

    def _encode_clip_only(self, image: np.ndarray, timings: dict[str, float]) -> ImageFeatures:
        """A CLIP-only method's image side.

        Dense features (E, Hg, Wg) on the token grid of the resized image, and what its labelling
        needs (clusters, ResCLIP's windows).
        """
        cfg, models = self.config, self.models
        clip = models.clip
        with self._stage(timings, 'windows'):
            resized, boxes, crops = self.windows(image, cfg.clip_slide_crop, cfg.clip_slide_stride)
        token_grid = (resized.shape[1] // clip.patch_size, resized.shape[2] // clip.patch_size)
        normalised = normalise(crops, clip.mean, clip.std, models.dtype)
        extra: dict[str, object] = {}
        with self._stage(timings, 'clip'):
            if cfg.method == 'cliptrase':
                result = cliptrase_pass(clip, normalised, cfg.cliptrase_eps, cfg.cliptrase_min_samples)
                features, grid = result.features[None], result.grid
                extra['clusters'] = cluster_map(result.recalibrated, result.clusters, grid, image.shape[:2])
            elif cfg.method == 'scclip':
                features, grid = scclip_features(clip, normalised)
            elif cfg.method in ('resclip', 'resclip_rcs'):
                sfr = cfg.method == 'resclip'
                windows = resclip_first_pass(clip, normalised, self._resclip_params(), with_sfr=sfr, pixels=crops)
                features, grid = windows.first, windows.grid
                if sfr:
                    extra['resclip'] = ResclipFrame(windows=windows, boxes=boxes, token_grid=token_grid)
            else:
                features, grid = clip_only_features(clip, normalised, cfg.method)
        with self._stage(timings, 'splice'):
            dense = _splice(features, grid, boxes, token_grid, clip.patch_size)
        return ImageFeatures(dense=dense, sam_image=None, original_size=image.shape[:2], timings=timings, **extra)

    def _resclip_params(self) -> ResclipParams:
        cfg = self.config
        return ResclipParams(cfg.resclip_rcs_lambda, cfg.resclip_sfr_tau, cfg.resclip_sfr_lambda, cfg.resclip_temp_thd)

    def _spliced_windows(self, image: np.ndarray, timings: dict[str, float]) -> torch.Tensor:
        """DINO-guided CLIP last block on the ``slide_crop`` windows, spliced: (D, Hg, Wg) on the
        token grid of the resized image.
        """
        cfg, models = self.config, self.models
        with self._stage(timings, 'windows'):
            resized, boxes, crops = self.windows(image, cfg.slide_crop, cfg.slide_stride)
        with self._stage(timings, 'dino'):
            dino = models.dino.patch_features(normalise(crops, models.dino.mean, models.dino.std, models.dtype))
        with self._stage(timings, 'clip'):
            values, clip_grid = models.clip.last_block_values(
                normalise(crops, models.clip.mean, models.clip.std, models.dtype))
            dino_grid = (cfg.slide_crop // models.dino.patch_size,) * 2
            attended = dino_guided_attention(dino, values, clip_grid, dino_grid, cfg.beta, cfg.gamma,
                                             mean_per_crop=cfg.method == 'proxy')  # ProxyCLIP: one window at a time
            tokens = models.clip.attention_output(attended)  # (B, Nd, D)
        with self._stage(timings, 'splice'):
            tokens = tokens.transpose(1, 2).reshape(len(boxes), -1, *dino_grid)
            patch = cfg.slide_crop // dino_grid[0]
            return splice_windows(tokens, boxes, (resized.shape[1] // patch, resized.shape[2] // patch), patch)

    def encode_image(self, image: np.ndarray) -> ImageFeatures:
        """Run the image encoders of ``config.method`` on one frame.

        With ``reuse_threshold`` > 0, a frame of the same size as the last encoded one, under the
        same configuration, whose mean absolute difference from it (grey levels over all pixels and
        channels) is at most the threshold gets the last encoded frame's image side instead (its
        timings: ``reuse_check`` only; ``image_side_reuses`` counts these). The comparison is with
        the last *encoded* frame, so a slow drift is encoded once it adds up to the threshold.

        Args:
            image: (H, W, 3) uint8 RGB.

        Returns:
            ImageFeatures with dense features (E, hs, ws) (see :class:`ImageFeatures` for the grid).
        """
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f'expected an (H, W, 3) uint8 RGB array, got {getattr(image, "shape", None)} '
                             f'{getattr(image, "dtype", type(image).__name__)}')
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f'empty image {image.shape}')
        threshold = self.config.reuse_threshold
        if threshold > 0 and self._last_encoded is not None:
            start = time.perf_counter()
            last_image, last_config, last_features = self._last_encoded
            if (last_config == self.config and last_image.shape == image.shape
                    and mean_absolute_difference(image, last_image) <= threshold):
                self.image_side_reuses += 1
                return dataclasses.replace(last_features, timings={'reuse_check': time.perf_counter() - start})
        features = self._encode_image(image)
        if self.config.pamr:
            features.image = image.copy()
        self._last_encoded = (image.copy(), self.config, features) if threshold > 0 else None
        return features

    @torch.inference_mode()
    def _encode_image(self, image: np.ndarray) -> ImageFeatures:
        cfg, models = self.config, self.models
        timings: dict[str, float] = {}
        self.image_encoder_calls += 1
        if cfg.method in CLIP_ONLY_METHODS + CLIP_BLOCK_METHODS:
            return self._encode_clip_only(image, timings)

        spliced = self._spliced_windows(image, timings)  # its intermediates are freed before SAM runs
        sam_image = None
        aggregated = spliced  # proxy: no SAM aggregation, the window token grid
        if cfg.method != 'proxy':
            aggregation = SamAggregation(spliced, models.sam.token_grid(*image.shape[:2]), cfg.cos_fac,
                                         cfg.refine_neg_cos, cfg.aggregation_chunk)
            with self._stage(timings, 'sam_encoder'):
                sam_image = models.sam.encode(image, observer=aggregation)
            aggregated = aggregation.result()
            if models.device.type == 'cpu':  # fused into the encoder; its own time is exact on the CPU only
                timings['sam_encoder'] -= aggregation.seconds
                timings['aggregation'] = aggregation.seconds
        with self._stage(timings, 'projection'):
            dense = models.clip.project(aggregated.permute(1, 2, 0))  # (hs, ws, E)
            dense = F.normalize(dense.float(), dim=-1).permute(2, 0, 1).contiguous()
        if cfg.method != 'trident':  # the SAM embedding is only needed for refinement
            sam_image = None
        return ImageFeatures(dense=dense, sam_image=sam_image, original_size=image.shape[:2], timings=timings)

    def encode_vocabulary(self, vocabulary: str | Sequence[Sequence[str]]) -> Vocabulary:
        """Text features for a vocabulary: ``"sofa; couch, door"`` or ``[['sofa', 'couch'], ['door']]``.

        Only names not already cached are encoded. Raises ``VocabularyError`` for an unusable
        vocabulary; the returned Vocabulary's ``warnings`` say what was dropped or truncated.
        """
        with torch.inference_mode():
            if isinstance(vocabulary, str):
                parsed = parse_vocabulary(vocabulary, max_classes=self.config.max_classes)
            else:
                parsed = parse_vocabulary(', '.join('; '.join(names) for names in vocabulary),
                                          max_classes=self.config.max_classes)
            result = encode_vocabulary(parsed.classes, self.text_cache)
            result.warnings = list(parsed.warnings) + list(result.warnings)
            return result

    @torch.inference_mode()
    def label(self, features: ImageFeatures, vocabulary: Vocabulary) -> Segmentation:
        """Label a frame's cached image features with a vocabulary (no image encoder runs).

        SAM refinement runs when ``refine`` is on and the method is ``trident``; ResCLIP's second
        pass (``resclip``), PAMR (``pamr``) and CLIPtrase's cluster vote run here, on cached inputs.
        """
        cfg = self.config
        timings: dict[str, float] = {}
        dense = features.dense
        if features.resclip is not None and cfg.method == 'resclip':
            with self._stage(timings, 'resclip_sfr'):
                frame = features.resclip
                second = resclip_second_pass(self.models.clip, frame.windows, vocabulary, self._resclip_params())
                dense = _splice(second, frame.windows.grid, frame.boxes, frame.token_grid, self.models.clip.patch_size)
        logit_filter = None
        if cfg.pamr and features.image is not None:
            with self._stage(timings, 'pamr_affinity'):
                pixels = torch.from_numpy(features.image).to(dense.device).permute(2, 0, 1)[None].float()
                affinity = pamr_affinity(pixels)

            def logit_filter(logits: torch.Tensor) -> torch.Tensor:
                return pamr_refine(logits[None], affinity)[0]
        elif cfg.pamr:
            logger.warning('pamr is on but this frame was encoded without it: PAMR applies from the next frame')
        with self._stage(timings, 'labelling'):
            probs = class_probabilities(dense, vocabulary, features.original_size, cfg.logit_scale, logit_filter)
            if cfg.area_thd > 0:
                probs = drop_small_classes(probs, cfg.area_thd)
        refined = None
        if cfg.refine and cfg.method == 'trident':
            if features.sam_image is None:
                raise ConfigError('refine=True needs the SAM image embedding, which this frame has not')
            with self._stage(timings, 'refinement'):
                sam_image = features.sam_image
                refinement = refine_with_sam(probs, self.models.sam.model, sam_image.embedding, sam_image.input_size,
                                             sam_image.rounded_size,
                                             RefinementParams.from_config(cfg))
                probs, refined = refinement.scores, refinement.refined
        with self._stage(timings, 'masks'):
            if features.clusters is not None and cfg.method == 'cliptrase':
                labels, confidence = cluster_vote(probs, features.clusters, cfg.prob_thd)
            else:
                labels, confidence = label_map(probs, cfg.prob_thd, exempt=refined)
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


def _splice(features: torch.Tensor, grid: tuple[int, int], boxes: list[tuple[int, int, int, int]],
            token_grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Per-window unit features ``(B, gh*gw, E)`` spliced into ``(E, Hg, Wg)`` (averaged where windows overlap)."""
    return splice_windows(features.transpose(1, 2).reshape(len(boxes), -1, *grid), boxes, token_grid, patch)


def mean_absolute_difference(first: np.ndarray, second: np.ndarray) -> float:
    """Mean of ``|first - second|`` over every element of two same-shape uint8 arrays (grey levels)."""
    return cv2.norm(first, second, cv2.NORM_L1) / first.size


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """Normalise crops for an encoder: (B, 3, H, W) in [0, 1] -> ``(x - mean) / std`` in ``dtype``."""
    mean_t = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return ((images - mean_t) / std_t).to(dtype)
