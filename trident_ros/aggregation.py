"""Global aggregation of the spliced CLIP map with the attention of SAM's last encoder block.

Per SAM head h: C_h = cosine similarity of the value rows; per query m: tau_m = cos_fac * mean of
C over heads and keys (negative -> 0.6 when ``refine_neg_cos`` is off; capped at 0.9);
A'_h = A_h where C_h > tau else 0, A_h being the softmax attention (over the full padded grid)
cropped to the valid keys; W = mean over heads of A', normalised to row sum 1; out = W @ features.

Query rows are processed in chunks, so neither the (heads, N, N) attention nor the cosine map is
ever held whole (N = hs * ws, 4096 for a square image: about 0.8 GB in fp16 for the two).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

NEGATIVE_TAU_FALLBACK = 0.6
"""Threshold replacing a negative tau when ``refine_neg_cos`` is off (the reference's value)."""
TAU_CAP = 0.9
"""Upper bound of tau."""


class AttentionRows(Protocol):
    """What aggregation reads from SAM's last block (``models.SamAttentionCapture`` provides it)."""

    v: torch.Tensor
    """(heads, G, G, hd) values of the whole padded grid."""
    valid: tuple[int, int]
    """(hs, ws) unpadded token grid."""

    def attention_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(heads, len(rows), G*G) softmax attention of the query rows (flat indices into G*G)."""


@torch.inference_mode()
def aggregate_with_sam(features: torch.Tensor, attention: AttentionRows, cos_fac: float, refine_neg_cos: bool,
                       chunk_size: int) -> torch.Tensor:
    """Aggregate a dense feature map over the image with SAM's attention, chunk by chunk.

    Args:
        features: (D, Hg, Wg) spliced CLIP tokens; resized bilinearly to the SAM valid grid.
        attention: SAM's last-block capture (``v``, ``valid``, ``attention_rows``).
        cos_fac: factor on the mean value cosine giving each query's threshold tau.
        refine_neg_cos: keep a negative tau (False: a negative tau becomes 0.6).
        chunk_size: query rows per chunk; bounds memory, the result does not depend on it.
    Returns:
        (D, hs, ws), dtype of ``features``.

    The reference always keeps a query's own key (its cosine 1 exceeds tau <= 0.9 and its softmax
    weight is positive), so a row sums to 0 only when that weight underflows (fp16) or the value
    vector is zero; the reference then divides 0 by 0 (NaN). Here such a row keeps its own feature.
    """
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    valid_h, valid_w = attention.valid
    values = attention.v
    heads, _, grid_w, _ = values.shape
    count = valid_h * valid_w
    dim = features.shape[0]
    device = values.device

    unit = F.normalize(values[:, :valid_h, :valid_w].reshape(heads, count, -1), dim=-1)  # (heads, N, hd)
    resized = F.interpolate(features[None], size=(valid_h, valid_w), mode='bilinear', align_corners=False)[0]
    tokens = resized.reshape(dim, count).t()  # (N, D)
    ys = torch.arange(valid_h, device=device)
    xs = torch.arange(valid_w, device=device)
    grid_index = (ys[:, None] * grid_w + xs[None, :]).reshape(-1)  # valid token -> flat index into G*G
    crop_keys = count != values.shape[1] * values.shape[2]

    out = torch.empty(count, dim, dtype=features.dtype, device=features.device)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        attn = attention.attention_rows(grid_index[start:stop])  # (heads, c, G*G)
        if crop_keys:
            attn = attn.index_select(2, grid_index)  # (heads, c, N)
        cosine = unit[:, start:stop] @ unit.transpose(1, 2)  # (heads, c, N)
        tau = cos_fac * cosine.mean(dim=0).mean(dim=-1)  # (c,)
        if not refine_neg_cos:
            tau = torch.where(tau < 0, torch.full_like(tau, NEGATIVE_TAU_FALLBACK), tau)
        tau = torch.where(tau > TAU_CAP, torch.full_like(tau, TAU_CAP), tau)
        kept = torch.where(cosine > tau[None, :, None], attn, torch.zeros((), dtype=attn.dtype, device=device))
        mean = kept.mean(dim=0)  # (c, N)
        total = mean.sum(dim=-1, keepdim=True)
        empty = total == 0
        weights = mean / total.masked_fill(empty, 1)
        local = torch.arange(stop - start, device=device)
        weights[local, start + local] += empty[:, 0].to(weights.dtype)
        out[start:stop] = weights.to(tokens.dtype) @ tokens
    return out.t().reshape(dim, valid_h, valid_w).contiguous()
