"""SC-CLIP: self-calibrated CLIP (method ``scclip``), all image side.

Stage by stage after its authors' code (SuleBai/SC-CLIP 0417ba9, ``clip/model.py``), per crop:

1. Blocks 1-11 run unchanged; their outputs ``x_1 .. x_11`` are kept (VisionTransformer.forward).
2. Anomalous patches of ``x_11``: local outlier factor with 30 neighbours on squared Euclidean
   distances, above its 95th percentile (lof_pytorch): :func:`lof_outliers`. In ``x_11`` and
   ``x_9`` each anomaly becomes the mean of its non-anomalous 8-neighbours (mean_interpolation):
   :func:`repair_anomalies`.
3. ``S9``: cosine similarity of the repaired ``x_9`` patches; ``W9`` = ``S9`` with entries below
   0.4 zeroed, rows normalised; ``y = W9 x_11`` (adaptively_aggregate): :func:`aggregate`. The
   class token is dropped from here on.
4. Last block, attention only (no residual, no feed-forward): ``A = [softmax(3 (S9 - mean S9))
   (negative entries excluded) + softmax(s k k^T)] / 2`` on ``ln_1(y)`` (custom_attn):
   :func:`scclip_weights`; ``z = out_proj(A v) + 0.3 cls(x_11)``; then ``z = W4 z`` with ``W4``
   from the unrepaired ``x_4``.
5. Multi-level fusion: ``u = x_4 + ... + x_10``; the same attention on ``ln_1`` of its patches
   plus 0.3 times its class token, times ``W4``, added to ``z``; ``ln_post``, projection,
   L2 normalisation.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch idiom)

from trident_ros.methods.base import Frame
from trident_ros.methods.clip_rules import WINDOWS_336, Box, ClipWindowMethod
from trident_ros.models import ClipDense
from trident_ros.stages.clip_blocks import (
    block_heads,
    merge_heads,
    paper_block,
    self_softmax,
    trace_blocks,
    unit_features,
)

NEIGHBOURS = 30
CONTAMINATION = 0.05
SIMILARITY_FLOOR = 0.4
"""``beta``: similarities below it do not aggregate."""
CLASS_TOKEN_WEIGHT = 0.3
SIMILARITY_SHARPNESS = 3.0
ANOMALY_BLOCK, PRE_BLOCK, POST_BLOCK = 11, 9, 4
FUSION_BLOCKS = range(4, 11)
"""Blocks 4..10 (of 12) summed for the multi-level fusion."""


def lof_outliers(x: torch.Tensor, neighbours: int = NEIGHBOURS,
                 contamination: float = CONTAMINATION) -> tuple[torch.Tensor, torch.Tensor]:
    """Local-outlier-factor anomalies among tokens, as SC-CLIP scores them.

    ``d`` = squared Euclidean distance; ``kd_i`` = ``d`` to the ``neighbours``-th nearest other
    token; the score of ``i`` is the mean over its nearest ``neighbours`` tokens ``j`` of
    ``kd_i / kd_j``; anomalies score above the ``1 - contamination`` quantile.

    Args:
        x: ``(B, N, D)`` tokens.
        neighbours: neighbours per token (at most ``N - 1`` are used).
        contamination: expected anomaly fraction.

    Returns:
        ``anomalies (B, N)`` bool and ``scores (B, N)`` float32.
    """
    x = x.float()
    count = min(neighbours, x.shape[1] - 1)
    distances = torch.cdist(x, x) ** 2
    nearest, index = distances.topk(count + 1, dim=-1, largest=False)
    nearest, index = nearest[..., 1:], index[..., 1:]  # drop the token itself
    k_distance = nearest[..., -1]  # (B, N); the reach distance max(d_ij, kd_i) is kd_i for all neighbours
    density = count / k_distance.clamp(min=1e-12)
    scores = torch.gather(density[:, None, :].expand(-1, x.shape[1], -1), 2, index).div(density[..., None]).mean(-1)
    threshold = torch.quantile(scores, 1 - contamination, dim=1, keepdim=True)
    return scores > threshold, scores


def repair_anomalies(tokens: torch.Tensor, anomalies: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Replace each anomalous patch by the mean of its 8-neighbours that are not anomalous.

    An anomaly without such a neighbour keeps its value.

    Args:
        tokens: ``(B, N, D)`` patch tokens on the row-major ``grid``.
        anomalies: ``(B, N)`` bool.
        grid: ``(gh, gw)``.

    Returns:
        ``(B, N, D)`` (a new tensor).
    """
    batch, count, dim = tokens.shape
    normal = (~anomalies).to(tokens.dtype).reshape(batch, 1, *grid)
    maps = tokens.transpose(1, 2).reshape(batch, dim, *grid)
    ring = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[0, 0, 1, 1] = 0
    sums = F.conv2d(F.pad(maps * normal, (1, 1, 1, 1)), ring.expand(dim, 1, 3, 3), groups=dim)
    counts = F.conv2d(F.pad(normal, (1, 1, 1, 1)), ring)
    replace = anomalies.reshape(batch, 1, *grid) & (counts > 0)
    repaired = torch.where(replace, sums / counts.clamp(min=1), maps)
    return repaired.reshape(batch, dim, count).transpose(1, 2)


def cosine_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, N, D) -> (B, N, N)`` float32 cosine similarities."""
    unit = F.normalize(tokens.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def aggregate(tokens: torch.Tensor, similarity: torch.Tensor, floor: float = SIMILARITY_FLOOR) -> torch.Tensor:
    """``W x`` with ``W`` = ``similarity`` below ``floor`` zeroed, rows divided by their sum (+1e-6).

    Args:
        tokens: ``(B, N, D)``.
        similarity: ``(B, N, N)``.
        floor: smallest similarity that takes part.

    Returns:
        ``(B, N, D)`` in the dtype of ``tokens``.
    """
    weights = similarity.masked_fill(similarity < floor, 0)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    return (weights @ tokens.float()).to(tokens.dtype)


def scclip_weights(similarity: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """SC-CLIP's last-block attention ``[softmax(3 (S - mean S), S - mean S < 0 -> -inf) + softmax(s k k^T)] / 2``.

    ``mean S``: over the whole ``(N, N)`` matrix of each crop.

    Args:
        similarity: ``(B, N, N)`` ``S9`` (same for every head).
        k: ``(B, heads, N, hd)`` key heads.
        scale: ``hd ** -0.5``.

    Returns:
        ``(B, heads, N, N)`` float32.
    """
    centred = (similarity - similarity.mean(dim=(1, 2), keepdim=True)) * SIMILARITY_SHARPNESS
    guided = centred.masked_fill(centred < 0, float('-inf')).softmax(dim=-1)
    return (guided[:, None] + self_softmax(k, scale)) / 2


@torch.inference_mode()
def scclip_features(clip: ClipDense, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """SC-CLIP's dense features of crops (each crop calibrated on its own, as the reference runs one crop at a time).

    Args:
        clip: the CLIP wrapper.
        crops: ``(B, 3, h, w)`` CLIP-normalised, sides multiples of the patch size.

    Returns:
        ``(B, gh*gw, E)`` float32 unit patch features and the grid ``(gh, gw)``.
    """
    trace = trace_blocks(clip, crops)
    grid = trace.last.grid
    blocks = clip.visual.transformer.resblocks
    last = blocks[-1]
    depth = len(blocks)
    x11 = trace.after(paper_block(depth, ANOMALY_BLOCK))
    anomalies, _ = lof_outliers(x11[:, 1:])
    patches = repair_anomalies(x11[:, 1:], anomalies, grid)
    x9 = repair_anomalies(trace.after(paper_block(depth, PRE_BLOCK))[:, 1:], anomalies, grid)
    similarity9 = cosine_similarity(x9)
    similarity4 = cosine_similarity(trace.after(paper_block(depth, POST_BLOCK))[:, 1:])

    def attend(tokens: torch.Tensor, class_token: torch.Tensor) -> torch.Tensor:
        _, k, v = block_heads(last, tokens, clip.heads)
        weights = scclip_weights(similarity9, k, trace.last.scale)
        out = clip.attention_output(merge_heads(weights.to(v.dtype) @ v))
        return aggregate(out + CLASS_TOKEN_WEIGHT * class_token, similarity4)

    z = attend(aggregate(patches, similarity9), x11[:, :1])
    fused = sum(trace.after(paper_block(depth, block)) for block in FUSION_BLOCKS)
    z = z + attend(fused[:, 1:], fused[:, :1])
    return unit_features(clip, z), grid


class ScclipMethod(ClipWindowMethod):
    name = 'scclip'
    preset = WINDOWS_336
    """SuleBai/SC-CLIP ``configs/base_config.py``: short side 336, windows 224/112, logit scale 40."""
    summary = 'CLIP only, SC-CLIP: anomaly repair, similarity-guided aggregation, multi-level fusion'

    def window_features(self, frame: Frame, crops: torch.Tensor, normalised: torch.Tensor, boxes: list[Box],
                        token_grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], dict[str, Any]]:
        return (*scclip_features(frame.models.clip, normalised), {})


SCCLIP = ScclipMethod()
