"""CLIPtrase: self-correlation recalibration and patch clustering on CLIP (method ``cliptrase``).

Stage by stage after its authors' code (leaves162/CLIPtrase 2b7de61), on one whole-image pass:

1. Blocks 1-11 run unchanged; block 11 also yields the self-correlation
   ``C = mean_heads [cos(q, q) + cos(k, k) + cos(v, v)] / 3`` of its own heads
   (``clip_utils/attn2.py`` multi_head_attention_forward): :func:`self_correlation`.
2. The last block attends with ``softmax(s q q^T) + softmax(s k k^T) + softmax(s v v^T)`` per head
   (rows sum to 3), residual and feed-forward kept (``clip_utils/model.py``
   VisionTransformer.forward): :func:`cliptrase_weights`.
3. Global-patch removal ``R_ij = max(0, C_ij - C_cls,j)`` over the patches
   (``clip_self_correlation.py`` self_clip): :func:`remove_global_patch`.
4. DBSCAN on the rows of ``R`` (Euclidean; noise dropped) (self_clip, scikit-learn there): :func:`dbscan`;
   each cluster's map is the mean of its rows, upsampled 4x, 7x7 median filtered (edge-mirroring),
   upsampled to the image; every pixel takes the cluster of the largest map: :func:`cluster_map`.
5. At labelling, every pixel of a cluster takes the cluster's most frequent label: :func:`cluster_vote`.

Steps 1-4 are image side (the cluster map is cached with the frame); step 5 is vocabulary side.

DBSCAN's defaults at the authors' two sizes are eps 0.7 / min_samples 3 at 196 patches (224 px)
and 1.1 / 7 at 441 (336 px). The rows of ``R`` have one entry per patch, so the distance between
two rows grows as the square root of the patch count, and the number of patches in a region of
a given image fraction grows linearly with it: :func:`dbscan_defaults` scales
``eps = 0.7 sqrt(N / 196)`` and ``min_samples = round(3 N / 196)`` (441 patches: 1.05 and 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch idiom)

from trident_ros.methods.base import Frame, Labelling, MethodFeatures, ParamError, setting
from trident_ros.methods.clip_rules import Box, ClipWindowMethod
from trident_ros.models import ClipDense
from trident_ros.stages.clip_blocks import (
    block_heads,
    merge_heads,
    paper_block,
    self_softmax,
    trace_blocks,
    unit_features,
)

REFERENCE_PATCHES = 196
"""Patch count (224 px, ViT-B/16) at which the authors' DBSCAN defaults below hold."""
REFERENCE_EPS = 0.7
REFERENCE_MIN_SAMPLES = 3
MEDIAN_SIZE = 7
"""Side of the median filter on the cluster maps (4x upsampled token grid)."""
CORRELATION_BLOCK = 11
"""The block (of 12) whose heads give the self-correlation."""


def dbscan_defaults(num_patches: int) -> tuple[float, int]:
    """DBSCAN ``(eps, min_samples)`` for ``num_patches`` patches (see the module docstring)."""
    ratio = num_patches / REFERENCE_PATCHES
    return REFERENCE_EPS * math.sqrt(ratio), max(2, round(REFERENCE_MIN_SAMPLES * ratio))


def self_correlation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Mean over heads of ``[cos(q, q) + cos(k, k) + cos(v, v)] / 3``.

    Args:
        q: ``(B, heads, T, hd)`` query heads.
        k: ``(B, heads, T, hd)`` key heads.
        v: ``(B, heads, T, hd)`` value heads.

    Returns:
        ``(B, T, T)`` float32.
    """
    total = 0
    for x in (q, k, v):
        unit = F.normalize(x.float(), dim=-1)
        total = total + unit @ unit.transpose(-2, -1)
    return (total / 3).mean(dim=1)


def cliptrase_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(s q q^T) + softmax(s k k^T) + softmax(s v v^T)``: ``(..., T, hd) -> (..., T, T)`` float32."""
    return self_softmax(q, scale) + self_softmax(k, scale) + self_softmax(v, scale)


def remove_global_patch(correlation: torch.Tensor) -> torch.Tensor:
    """``R_ij = max(0, C_ij - C_0j)`` over the patches (token 0: the class token).

    Args:
        correlation: ``(..., T, T)`` self-correlation, class token first.

    Returns:
        ``(..., T - 1, T - 1)``.
    """
    return (correlation[..., 1:, 1:] - correlation[..., :1, 1:]).clamp_(min=0)


def dbscan(points: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """DBSCAN with Euclidean distances, as scikit-learn's ``DBSCAN(eps, min_samples)`` labels points.

    A core point has at least ``min_samples`` points (itself included) within ``eps``; clusters are
    the connected components of core points within ``eps`` of each other, numbered in the order of
    their first point; a non-core point within ``eps`` of core points joins the lowest-numbered of
    their clusters (scikit-learn's expansion order), other points are noise.

    Args:
        points: ``(N, F)``.
        eps: neighbourhood radius.
        min_samples: neighbours (self included) that make a core point.

    Returns:
        ``(N,)`` int64 cluster ids ``0..C-1``, ``-1`` for noise.
    """
    count = points.shape[0]
    near = torch.cdist(points.float(), points.float()) <= eps
    core = near.sum(dim=1) >= min_samples
    none = torch.tensor(count, device=points.device)
    index = torch.arange(count, device=points.device)
    links = near & core[:, None] & core[None, :]
    label = torch.where(core, index, none)
    while True:  # each core point takes the smallest index of its component
        spread = torch.where(links, label[None, :], none).amin(dim=1)
        spread = torch.minimum(label, spread)
        spread = torch.where(core, spread[spread.clamp(max=count - 1)], none)  # pointer jumping
        if torch.equal(spread, label):
            break
        label = spread
    border = ~core & (near & core[None, :]).any(dim=1)
    reach = torch.where(near & core[None, :], label[None, :], none).amin(dim=1)
    label = torch.where(border, reach, label)
    roots = torch.unique(label[label < count])
    ids = torch.full((count + 1,), -1, dtype=torch.long, device=points.device)
    ids[roots] = torch.arange(len(roots), device=points.device)
    return ids[label]


def median_filter(maps: torch.Tensor, size: int = MEDIAN_SIZE) -> torch.Tensor:
    """Per-channel ``size x size`` median, borders mirrored with the edge repeated (scipy's ``reflect``).

    Args:
        maps: ``(C, H, W)``.
        size: odd filter side.

    Returns:
        ``(C, H, W)``.
    """
    pad = size // 2
    height, width = maps.shape[-2:]

    def mirrored(length: int) -> torch.Tensor:
        index = torch.arange(-pad, length + pad, device=maps.device)
        period = 2 * length
        index = index % period
        return torch.where(index >= length, period - 1 - index, index)

    padded = maps[:, mirrored(height)][:, :, mirrored(width)]
    windows = padded.unfold(1, size, 1).unfold(2, size, 1)  # (C, H, W, size, size)
    return windows.reshape(*windows.shape[:3], -1).median(dim=-1).values


def cluster_map(recalibrated: torch.Tensor, clusters: torch.Tensor, grid: tuple[int, int],
                out_size: tuple[int, int]) -> torch.Tensor | None:
    """Which cluster every output pixel belongs to.

    Args:
        recalibrated: ``(N, N)`` ``R`` of :func:`remove_global_patch`.
        clusters: ``(N,)`` :func:`dbscan` ids (``-1`` noise).
        grid: ``(gh, gw)`` with ``gh * gw == N``.
        out_size: ``(H, W)``.

    Returns:
        ``(H, W)`` int16 cluster ids, or None when DBSCAN found no cluster.
    """
    count = int(clusters.max()) + 1
    if count <= 0:
        return None
    member = F.one_hot(clusters.clamp(min=0), count).float() * (clusters >= 0)[:, None]  # (N, C)
    maps = (member.T @ recalibrated.float()) / member.sum(dim=0)[:, None]  # (C, N): mean of the rows
    maps = F.interpolate(maps.reshape(1, count, *grid), scale_factor=4, mode='bilinear', align_corners=False)[0]
    maps = median_filter(maps)
    maps = F.interpolate(maps[None], size=out_size, mode='bilinear', align_corners=False)[0]
    return maps.argmax(dim=0).to(torch.int16)


def cluster_vote(probs: torch.Tensor, clusters: torch.Tensor, prob_thd: float) -> tuple[np.ndarray, np.ndarray]:
    """Label image where every pixel of a cluster takes the cluster's most frequent argmax class.

    Args:
        probs: ``(K, H, W)`` class probabilities.
        clusters: ``(H, W)`` cluster ids (:func:`cluster_map`).
        prob_thd: pixels whose probability of the voted class is lower stay unlabeled (0).

    Returns:
        ``labels (H, W)`` (class + 1, 0 unlabeled; uint8 for K <= 255, else uint16) and
        ``confidence (H, W)`` float32: each pixel's probability of its voted class.
    """
    num_classes = probs.shape[0]
    best = probs.argmax(dim=0).reshape(-1)
    cluster = clusters.to(device=probs.device, dtype=torch.long).reshape(-1)
    count = int(cluster.max()) + 1
    votes = torch.bincount(cluster * num_classes + best, minlength=count * num_classes).reshape(count, num_classes)
    voted = votes.argmax(dim=1)[cluster]  # (H*W,)
    confidence = probs.reshape(num_classes, -1).gather(0, voted[None])[0]
    labels = (voted + 1).masked_fill_(confidence < prob_thd, 0).reshape(probs.shape[1:])
    dtype = np.uint8 if num_classes <= np.iinfo(np.uint8).max else np.uint16
    return labels.cpu().numpy().astype(dtype), confidence.reshape(probs.shape[1:]).float().cpu().numpy()


@dataclass
class CliptraseResult:
    """One pass of CLIPtrase.

    Attributes:
        features: ``(gh*gw, E)`` unit patch features.
        grid: ``(gh, gw)``.
        recalibrated: ``(N, N)`` ``R`` of :func:`remove_global_patch`.
        clusters: ``(N,)`` DBSCAN ids (``-1`` noise).
    """

    features: torch.Tensor
    grid: tuple[int, int]
    recalibrated: torch.Tensor
    clusters: torch.Tensor


@torch.inference_mode()
def cliptrase_pass(clip: ClipDense, image: torch.Tensor, eps: float = 0.0, min_samples: int = 0) -> CliptraseResult:
    """CLIPtrase's features and patch clusters of one image.

    Args:
        clip: the CLIP wrapper.
        image: ``(1, 3, h, w)`` CLIP-normalised, sides multiples of the patch size.
        eps: DBSCAN radius; 0: :func:`dbscan_defaults`.
        min_samples: DBSCAN core count; 0: :func:`dbscan_defaults`.

    Returns:
        :class:`CliptraseResult`.
    """
    if image.shape[0] != 1:
        raise ValueError(f'CLIPtrase clusters one image at a time, got {image.shape[0]}')
    trace = trace_blocks(clip, image)
    blocks = clip.visual.transformer.resblocks
    index = paper_block(len(blocks), CORRELATION_BLOCK)
    q, k, v = block_heads(blocks[index - 1], trace.after(index - 1), clip.heads)
    recalibrated = remove_global_patch(self_correlation(q, k, v))[0]  # (N, N)
    last = trace.last
    weights = cliptrase_weights(last.q, last.k, last.v, last.scale)
    out = clip.residual_feed_forward(last.x, clip.attention_output(merge_heads(weights.to(last.v.dtype) @ last.v)))
    default_eps, default_min = dbscan_defaults(recalibrated.shape[0])
    clusters = dbscan(recalibrated, eps or default_eps, min_samples or default_min)
    return CliptraseResult(features=unit_features(clip, out[0, 1:]), grid=last.grid, recalibrated=recalibrated,
                           clusters=clusters)


@dataclass(frozen=True)
class CliptraseParams:
    """Section ``cliptrase``."""

    eps: float = setting(0.0, "DBSCAN radius; 0: 0.7 * sqrt(patches / 196) (the authors' 0.7 at 224 px, 1.1 at 336)")
    min_samples: int = setting(0, "DBSCAN core count; 0: round(3 * patches / 196) (the authors' 3 at 224 px, 7 at "
                                  '336)')

    def validate(self) -> None:
        """Raise :class:`~trident_ros.methods.base.ParamError` for the first invalid field."""
        for name in ('eps', 'min_samples'):
            if getattr(self, name) < 0:
                raise ParamError(name, 'must be >= 0 (0: auto)')


@dataclass
class CliptraseFeatures(MethodFeatures):
    """CLIPtrase's image side: ``dense`` on the token grid of the resized image.

    Attributes:
        clusters: ``(H, W)`` int16 cluster of every pixel, or None (no cluster found).
    """

    clusters: torch.Tensor | None = None


class CliptraseMethod(ClipWindowMethod):
    name = 'cliptrase'
    section = 'cliptrase'
    params = CliptraseParams
    preset = MappingProxyType({'windows.input_short_side': 336, 'windows.whole_image': True,
                               'labelling.logit_scale': 100.0, 'labelling.prob_thd': 0.0})
    """leaves162/CLIPtrase ``clip_self_correlation.py``: one whole-image pass, short side 336, logit scale 100."""
    summary = 'CLIP only, CLIPtrase: self-correlation recalibration, patch clusters, a vote per cluster'
    features_type = CliptraseFeatures

    def whole_image(self, config: Any) -> bool:
        """Always: the clusters are of one whole-image pass."""
        return True

    def window_features(self, frame: Frame, crops: torch.Tensor, normalised: torch.Tensor, boxes: list[Box],
                        token_grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], dict[str, Any]]:
        params: CliptraseParams = frame.config.section(self.section)
        result = cliptrase_pass(frame.models.clip, normalised, params.eps, params.min_samples)
        clusters = cluster_map(result.recalibrated, result.clusters, result.grid, frame.image.shape[:2])
        return result.features[None], result.grid, {'clusters': clusters}

    def label(self, probs: torch.Tensor, features: CliptraseFeatures, refined: torch.Tensor | None,
              labelling: Labelling) -> tuple[np.ndarray, np.ndarray]:
        """Every pixel of a cluster takes the cluster's most frequent label (:func:`cluster_vote`)."""
        if features.clusters is None:
            return super().label(probs, features, refined, labelling)
        return cluster_vote(probs, features.clusters, labelling.config.labelling.prob_thd)


CLIPTRASE = CliptraseMethod()
