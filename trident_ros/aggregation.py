"""Global aggregation of the spliced CLIP map with the attention of SAM's last encoder block.

Per SAM head h: C_h = cosine similarity of the value rows; per query m: tau_m = cos_fac * mean of
C over heads and keys (negative -> 0.6 when ``refine_neg_cos`` is off; capped at 0.9);
A'_h = A_h where C_h > tau else 0, A_h being the softmax attention (over the full padded grid)
cropped to the valid keys; W = mean over heads of A', normalised to row sum 1; out = W @ features.

Query rows are processed in chunks, so neither the (heads, N, N) attention nor the cosine map is
ever held whole (N = hs * ws, 4096 for a square image: 805 MB each in fp32). Per chunk of c rows
the work is done in place on two (heads, c, ·) blocks: the attention rows (cropped by a strided
view, not a copy) and the cosine block, which becomes the mask and then the kept attention. The
mean over heads is a sum (the 1/heads factor cancels in the row normalisation) and tau comes from
the per-head sums of the unit value vectors (mean_k u_m . u_k = u_m . mean_k u_k), so no
(c, N) mean over the cosine block is needed.
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


def aggregation_chunk_bytes(heads: int, grid: tuple[int, int], chunk_size: int, element_size: int) -> int:
    """Bytes of the per-chunk blocks :func:`aggregate_with_sam` holds at once at most: the logits
    and softmax of ``chunk_size`` attention rows over the ``G*G`` padded grid (inside
    ``attention_rows``), then the softmax and the cosine block."""
    return 2 * heads * chunk_size * grid[0] * grid[1] * element_size


@torch.inference_mode()
def aggregate_with_sam(features: torch.Tensor, attention: AttentionRows, cos_fac: float, refine_neg_cos: bool,
                       chunk_size: int) -> torch.Tensor:
    """Aggregate a dense feature map over the image with SAM's attention, chunk by chunk.

    Args:
        features: (D, Hg, Wg) spliced CLIP tokens; resized bilinearly to the SAM valid grid.
        attention: SAM's last-block capture (``v``, ``valid``, ``attention_rows``).
        cos_fac: factor on the mean value cosine giving each query's threshold tau.
        refine_neg_cos: keep a negative tau (False: a negative tau becomes 0.6).
        chunk_size: query rows per chunk; bounds memory (:func:`aggregation_chunk_bytes`), the
            result does not depend on it.
    Returns:
        (D, hs, ws), dtype of ``features``.

    Besides the per-chunk blocks, the function holds the unit values (heads, N, hd), the resized
    features (D, N) and the output (D, N): at 64 x 64 SAM tokens (ViT-B: 12 heads, D = 768, fp32)
    38 MB, plus 2 * 12 * chunk_size * 4096 * 4 bytes of blocks.

    The reference always keeps a query's own key (its cosine 1 exceeds tau <= 0.9 and its softmax
    weight is positive), so a row sums to 0 only when that weight underflows (fp16) or the value
    vector is zero; the reference then divides 0 by 0 (NaN). Here such a row keeps its own feature.
    """
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    valid_h, valid_w = attention.valid
    values = attention.v
    heads, grid_h, grid_w, _ = values.shape
    count = valid_h * valid_w
    dim = features.shape[0]
    device = values.device

    unit = F.normalize(values[:, :valid_h, :valid_w].reshape(heads, count, -1), dim=-1)  # (heads, N, hd)
    unit_t = unit.transpose(1, 2)  # (heads, hd, N)
    # tau_m = cos_fac * mean_h mean_k (u_hm . u_hk) = cos_fac / heads * sum_h u_hm . (mean_k u_hk)
    key_mean = unit.mean(dim=1).unsqueeze(-1).mul_(cos_fac / heads)  # (heads, hd, 1)
    # channels as the batch: the same bilinear resize without the (1, D, Hg, Wg) input's channels-last copy
    resized = F.interpolate(features[:, None], size=(valid_h, valid_w), mode='bilinear', align_corners=False)
    tokens = resized.reshape(dim, count)  # (D, N)
    ys = torch.arange(valid_h, device=device)
    xs = torch.arange(valid_w, device=device)
    grid_index = (ys[:, None] * grid_w + xs[None, :]).reshape(-1)  # valid token -> flat index into G*G

    out = torch.empty(dim, count, dtype=features.dtype, device=features.device)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        rows = stop - start
        attn = attention.attention_rows(grid_index[start:stop])  # (heads, c, G*G)
        attn = attn.unflatten(-1, (grid_h, grid_w))[..., :valid_h, :valid_w]  # valid keys: a view
        queries = unit[:, start:stop]  # (heads, c, hd)
        tau = torch.bmm(queries, key_mean).sum(dim=0)  # (c, 1)
        if not refine_neg_cos:
            tau = torch.where(tau < 0, torch.full_like(tau, NEGATIVE_TAU_FALLBACK), tau)
        tau = tau.clamp_(max=TAU_CAP)
        kept = torch.bmm(queries, unit_t)  # (heads, c, N): cosine ...
        kept.gt_(tau)  # ... then 1 where it exceeds tau, else 0 ...
        kept.view(heads, rows, valid_h, valid_w).mul_(attn)  # ... then the kept attention
        del attn
        weights = kept.sum(dim=0)  # (c, N); the mean's 1/heads cancels below
        del kept
        total = weights.sum(dim=-1, keepdim=True)
        empty = total == 0
        weights.div_(total.masked_fill_(empty, 1))
        local = torch.arange(rows, device=device)
        weights[local, start + local] += empty[:, 0].to(weights.dtype)
        out[:, start:stop] = tokens @ weights.t().to(tokens.dtype)
    return out.view(dim, valid_h, valid_w)
