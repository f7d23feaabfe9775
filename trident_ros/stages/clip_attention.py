"""CLIP-only methods: training-free segmenters that change nothing but CLIP's last block.

Every block but the last runs as usual on a crop; the last block's attention is replaced by a
method's rule over the same query, key and value heads (``s = head_dim ** -0.5``, softmax over
the keys, every token including the class token taking part), then ``out_proj``; the residual
and the feed-forward branch are kept or dropped as the method says; ``ln_post`` and the visual
projection follow, and the class token is dropped. What each reference does (read from its code):

=========  ==============================================  ========================  =======================
method     attention weights ``A`` (per head)              residual + ln_2/MLP       reference
=========  ==============================================  ========================  =======================
maskclip   none: the value path, output ``out_proj(v)``    kept                      chongzhou96/MaskCLIP
                                                                                     ``backbones/vit.py``
sclip      ``softmax(s q q^T) + softmax(s k k^T)``         kept                      wangf3014/SCLIP
           (rows sum to 2, not renormalised)                                         ``clip/model.py``
clearclip  ``softmax(s q q^T)``                            dropped                   mc-lan/ClearCLIP
                                                                                     (``ignore_residual``)
naclip     ``softmax(s k k^T + G)``, ``G`` a Gaussian of    dropped ("reduced")       sinahmr/NACLIP
           the patch distance, std 5, 0 for the class token                          ``clip/model.py``
=========  ==============================================  ========================  =======================

All four references run CLIP on sliding windows (SCLIP, NACLIP: crop 224, stride 112; ClearCLIP's
code: 448/224) and average the per-crop logits of the L2-normalised patch features; here the
per-crop features are L2-normalised and then spliced (averaged where windows overlap), which gives
the same average of logits on the token grid (the references average after upsampling each crop's
logits to pixels, and cut their windows from the rescaled image at any pixel offset). PAMR, which
SCLIP offers (off by default) and NACLIP runs by default, is not applied; ClearCLIP has none.
``docs/fidelity.md`` lists these and the other remaining differences.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trident_ros.models.clip import ClipDense, ClipLastBlock

NACLIP_GAUSSIAN_STD = 5.0
"""NACLIP's default standard deviation (in patches) of its neighbourhood prior."""


def sclip_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """SCLIP's correlative self-attention: ``softmax(s q q^T) + softmax(s k k^T)``.

    Args:
        q: Query heads ``(..., T, hd)``.
        k: Key heads ``(..., T, hd)``.
        scale: ``s = head_dim ** -0.5``.

    Returns:
        ``(..., T, T)`` float32 weights (rows sum to 2).
    """
    q, k = q.float(), k.float()
    return (q @ q.transpose(-2, -1) * scale).softmax(dim=-1) + (k @ k.transpose(-2, -1) * scale).softmax(dim=-1)


def clearclip_weights(q: torch.Tensor, scale: float) -> torch.Tensor:
    """ClearCLIP's query-query attention: ``softmax(s q q^T)``.

    Args:
        q: Query heads ``(..., T, hd)``.
        scale: ``s = head_dim ** -0.5``.

    Returns:
        ``(..., T, T)`` float32 weights.
    """
    q = q.float()
    return (q @ q.transpose(-2, -1) * scale).softmax(dim=-1)


def neighbourhood_prior(grid: tuple[int, int], std: float, device: torch.device | None = None) -> torch.Tensor:
    """NACLIP's additive neighbourhood prior over ``1 + gh*gw`` tokens (class token first).

    Between patches ``i`` and ``j`` at grid positions ``p_i``, ``p_j``:
    ``exp(-|p_i - p_j|^2 / (2 std^2))``; the class token's row and column are 0.

    Args:
        grid: The patch grid ``(gh, gw)``.
        std: Standard deviation of the Gaussian, in patches.
        device: Where to build the prior (None: the default device).

    Returns:
        ``(1 + gh*gw, 1 + gh*gw)`` float32.
    """
    gh, gw = grid
    rows = torch.arange(gh, device=device, dtype=torch.float32).repeat_interleave(gw)
    cols = torch.arange(gw, device=device, dtype=torch.float32).repeat(gh)
    distance2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    return F.pad(torch.exp(-distance2 / (2 * std * std)), (1, 0, 1, 0))


def naclip_weights(k: torch.Tensor, scale: float, grid: tuple[int, int],
                   std: float = NACLIP_GAUSSIAN_STD) -> torch.Tensor:
    """NACLIP's neighbourhood-aware attention: ``softmax(s k k^T + G)`` with ``G`` from
    :func:`neighbourhood_prior`.

    Args:
        k: Key heads ``(..., 1 + gh*gw, hd)``, class token first.
        scale: ``s = head_dim ** -0.5``.
        grid: The patch grid ``(gh, gw)``.
        std: Standard deviation of the prior, in patches.

    Returns:
        ``(..., T, T)`` float32 weights.
    """
    k = k.float()
    return (k @ k.transpose(-2, -1) * scale + neighbourhood_prior(grid, std, k.device)).softmax(dim=-1)


@dataclass(frozen=True)
class LastBlockRule:
    """A CLIP-only method's last block: its attention weights (None: the value path alone) and
    whether it keeps the block's residual and feed-forward branch.
    """

    weights: Callable[[ClipLastBlock], torch.Tensor] | None
    residual: bool


RULES: dict[str, LastBlockRule] = {
    'maskclip': LastBlockRule(weights=None, residual=True),
    'sclip': LastBlockRule(weights=lambda b: sclip_weights(b.q, b.k, b.scale), residual=True),
    'clearclip': LastBlockRule(weights=lambda b: clearclip_weights(b.q, b.scale), residual=False),
    'naclip': LastBlockRule(weights=lambda b: naclip_weights(b.k, b.scale, b.grid), residual=False),
}


def attend(block: ClipLastBlock, rule: LastBlockRule) -> torch.Tensor:
    """``A @ v`` per head (``v`` itself for the value path), heads concatenated.

    Args:
        block: The last block's heads (``v`` is ``(B, heads, T, hd)``).
        rule: The method's rule; ``rule.weights`` None takes the value path.

    Returns:
        ``(B, T, D)`` in the dtype of ``v``, before ``out_proj``.
    """
    v = block.v
    out = v if rule.weights is None else rule.weights(block).to(v.dtype) @ v  # (B, heads, T, hd)
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


@torch.inference_mode()
def clip_only_features(clip: ClipDense, crops: torch.Tensor, method: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Dense features of crops with a CLIP-only method's last block.

    Args:
        clip: The dense CLIP wrapper.
        crops: ``(B, 3, h, w)`` CLIP-normalised, sides multiples of the patch size.
        method: A key of :data:`RULES`.

    Returns:
        ``(B, gh*gw, E)`` float32 L2-normalised patch features (class token dropped) and the
        grid ``(gh, gw)``.

    Raises:
        ValueError: ``method`` is not a CLIP-only method.
    """
    if method not in RULES:
        raise ValueError(f'{method!r} is not a CLIP-only method ({", ".join(RULES)})')
    rule = RULES[method]
    block = clip.last_block_qkv(crops)
    out = clip.attention_output(attend(block, rule))  # (B, T, D)
    if rule.residual:
        out = clip.residual_feed_forward(block.x, out)
    features = clip.project(out[:, 1:])  # (B, gh*gw, E)
    return F.normalize(features.float(), dim=-1), block.grid
