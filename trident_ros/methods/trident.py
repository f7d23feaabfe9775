"""Trident (methods ``trident`` and ``trident_fast``): DINO-guided CLIP windows, SAM aggregation, SAM refinement.

The image side: the DINO-guided CLIP last block on ``windows.slide_crop`` windows (:func:`spliced_windows`, shared
with ``proxy``), spliced; SAM's encoder, whose last block's attention aggregates the spliced map onto SAM's token
grid as the block computes it (:class:`~trident_ros.stages.sam_aggregation.SamAggregation`); CLIP's projection. The
vocabulary side: the common labelling, then (``trident`` only, ``refinement.refine``) SAM refinement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trident_ros.methods.base import Frame, Labelling, Method, MethodFeatures, ParamError, setting
from trident_ros.models import SamImage
from trident_ros.stages.sam_aggregation import SamAggregation, resize_features
from trident_ros.stages.sam_refinement import RefinementParams, refine_with_sam
from trident_ros.stages.splice import splice_windows
from trident_ros.stages.windows import cut_windows, dino_guided_attention, normalise


@dataclass(frozen=True)
class TridentParams:
    """Section ``trident`` (methods trident and trident_fast)."""

    beta: float = setting(1.2, 'DINO similarity mean offset factor')
    gamma: float = setting(3.0, 'DINO similarity sharpening factor')
    cos_fac: float = setting(1.2, 'SAM aggregation threshold factor on mean value cosine')
    refine_neg_cos: bool = setting(True, 'keep a negative SAM threshold (false: a negative threshold becomes 0.6)')
    aggregation_chunk: int = setting(64, 'queries per chunk of the SAM aggregation, rounded down to whole token '
                                         'rows (at least one); memory bound, the result does not depend on it')

    def validate(self) -> None:
        """Raise :class:`ParamError` for the first invalid field."""
        check_beta_gamma(self.beta, self.gamma)
        if not self.cos_fac > 0:
            raise ParamError('cos_fac', 'must be > 0')
        if self.aggregation_chunk <= 0:
            raise ParamError('aggregation_chunk', 'must be positive')


def check_beta_gamma(beta: float, gamma: float) -> None:
    """Raise :class:`ParamError` unless ``beta >= 0`` and ``gamma > 0``."""
    if beta < 0:
        raise ParamError('beta', 'must be >= 0')
    if not gamma > 0:
        raise ParamError('gamma', 'must be > 0')


@dataclass
class TridentFeatures(MethodFeatures):
    """Trident's image side: ``dense`` ``(E, hs, ws)`` on SAM's valid token grid.

    Attributes:
        sam_image: SAM's image embedding and sizes, kept for refinement (None for ``trident_fast``).
    """

    sam_image: SamImage | None = None


def spliced_windows(frame: Frame, beta: float, gamma: float, mean_per_crop: bool) -> torch.Tensor:
    """DINO-guided CLIP last block on the ``windows.slide_crop`` windows, spliced.

    Args:
        frame: the frame.
        beta: DINO similarity mean offset factor.
        gamma: DINO similarity sharpening factor.
        mean_per_crop: the similarity mean per window (ProxyCLIP, which runs one window at a time) instead of over
            all windows of the frame (Trident).

    Returns:
        ``(D, Hg, Wg)`` on the DINO token grid of the resized image.
    """
    windows, models = frame.config.windows, frame.models
    with frame.stage('windows'):
        resized, boxes, crops = cut_windows(frame.image, windows.input_short_side, windows.max_long_side,
                                            windows.slide_crop, windows.slide_stride, frame.patch, models.device)
    graphs, crop = frame.graphs, windows.slide_crop
    dino_grid = (crop // models.dino.patch_size,) * 2
    if graphs is not None and graphs.has('dino_patches', crop) and graphs.has('clip_guided', crop):
        with frame.stage('dino'):
            unit, sums = graphs.run('dino_patches', crops)
        with frame.stage('clip'):
            pairs = unit.shape[1] ** 2
            mean = sums / pairs if mean_per_crop else (sums.sum() / (pairs * len(sums))).expand(len(sums))
            tokens = graphs.run('clip_guided', crops, unit, mean * beta, torch.tensor([gamma]))[0]
    else:
        with frame.stage('dino'):
            dino = models.dino.patch_features(normalise(crops, models.dino.mean, models.dino.std, models.dtype))
        with frame.stage('clip'):
            values, clip_grid = models.clip.last_block_values(
                normalise(crops, models.clip.mean, models.clip.std, models.dtype))
            attended = dino_guided_attention(dino, values, clip_grid, dino_grid, beta, gamma,
                                             mean_per_crop=mean_per_crop)
            tokens = models.clip.attention_output(attended)  # (B, Nd, D)
    with frame.stage('splice'):
        tokens = tokens.transpose(1, 2).reshape(len(boxes), -1, *dino_grid)
        patch = models.dino.patch_size
        return splice_windows(tokens, boxes, (resized.shape[1] // patch, resized.shape[2] // patch), patch)


def project(frame: Frame, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's projection of ``(D, h, w)`` tokens, L2-normalised: ``(E, h, w)`` float32 (stage ``projection``)."""
    with frame.stage('projection'):
        dense = frame.models.clip.project(tokens.permute(1, 2, 0))  # (h, w, E)
        return F.normalize(dense.float(), dim=-1).permute(2, 0, 1).contiguous()


def fused_sam(frame: Frame, spliced: torch.Tensor, params: TridentParams) -> tuple[torch.Tensor, SamImage]:
    """SAM's encoder, the aggregation of ``spliced`` (D, Hg, Wg) and the projection through the ``sam_fused`` graph:
    dense ``(E, hs, ws)`` float32 L2-normalised, and the SAM image.
    """
    sam = frame.models.sam
    resized, rounded = sam.resize(frame.image)
    pixels = sam.encoder_input(resized)
    grid = sam.model.prompt_encoder.image_embedding_size
    valid = sam.token_grid(*frame.image.shape[:2])
    features = spliced.new_zeros(spliced.shape[0], *grid)
    features[:, :valid[0], :valid[1]] = resize_features(spliced, valid)
    key_mask = torch.zeros(grid, device=spliced.device)
    key_mask[:valid[0], :valid[1]] = 1
    embedding, dense = frame.graphs.run('sam_fused', pixels, features, key_mask.reshape(-1),
                                        torch.tensor([params.cos_fac]), torch.tensor([float(params.refine_neg_cos)]))
    sam_image = SamImage(embedding=embedding, input_size=(resized.shape[0], resized.shape[1]),
                         original_size=frame.image.shape[:2], rounded_size=rounded)
    return dense[:, :valid[0], :valid[1]].contiguous(), sam_image


class TridentMethod(Method):
    """Trident with (``refines``) or without SAM refinement."""

    models = ('clip', 'dino', 'sam')
    window_models = ('clip', 'dino')
    crop_field = 'windows.slide_crop'
    stride_field = 'windows.slide_stride'
    section = 'trident'
    params = TridentParams

    def __init__(self, name: str, refines: bool, summary: str) -> None:
        self.name = name
        self.refines = refines
        self.summary = summary

    def graphs(self, config: Any) -> tuple[tuple[str, int], ...]:
        crop = config.windows.slide_crop
        return (('dino_patches', crop), ('clip_guided', crop), ('sam_fused', 0),
                *((('sam_decoder', 0),) if self.refines else ()))

    def encode_image(self, frame: Frame) -> TridentFeatures:
        params: TridentParams = frame.config.section(self.section)
        spliced = spliced_windows(frame, params.beta, params.gamma, mean_per_crop=False)
        sam = frame.models.sam  # the spliced windows' intermediates are freed before SAM runs
        if frame.graphs is not None and frame.graphs.has('sam_fused'):
            with frame.stage('sam_encoder'):
                dense, sam_image = fused_sam(frame, spliced, params)
            return TridentFeatures(dense=dense, sam_image=sam_image if self.refines else None)
        aggregation = SamAggregation(spliced, sam.token_grid(*frame.image.shape[:2]), params.cos_fac,
                                     params.refine_neg_cos, params.aggregation_chunk)
        with frame.stage('sam_encoder'):
            sam_image = sam.encode(frame.image, observer=aggregation)
        if frame.models.device.type == 'cpu':  # fused into the encoder; its own time is exact on the CPU only
            frame.timings['sam_encoder'] -= aggregation.seconds
            frame.timings['aggregation'] = aggregation.seconds
        return TridentFeatures(dense=project(frame, aggregation.result()),
                               sam_image=sam_image if self.refines else None)

    def refine(self, probs: torch.Tensor, features: TridentFeatures,
               labelling: Labelling) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SAM refinement (``trident`` with ``refinement.refine``), prompted by every class region at once."""
        config = labelling.config
        if not (self.refines and config.refinement.refine):
            return probs, None
        sam_image = features.sam_image
        if sam_image is None:
            raise ValueError('refinement needs the SAM image embedding, which this frame has not')
        graphs = labelling.graphs
        decoder = None
        if graphs is not None and graphs.has('sam_decoder'):
            def decoder(*inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return tuple(graphs.run('sam_decoder', *inputs))
        with labelling.stage('refinement'):
            refinement = refine_with_sam(probs, labelling.models.sam.model, sam_image.embedding, sam_image.input_size,
                                         sam_image.rounded_size, RefinementParams.from_config(config), decoder)
        return refinement.scores, refinement.refined


TRIDENT = TridentMethod('trident', refines=True, summary='CLIP + DINO + SAM: SAM aggregation and refinement')
TRIDENT_FAST = TridentMethod('trident_fast', refines=False, summary='trident without SAM refinement')
