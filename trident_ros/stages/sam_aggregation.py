"""Global aggregation of the spliced CLIP map with the attention of SAM's last encoder block.

Per SAM head h: C_h = cosine similarity of the value rows; per query m: tau_m = cos_fac * mean of
C over heads and keys (negative -> 0.6 when ``refine_neg_cos`` is off; capped at 0.9);
A'_h = A_h where C_h > tau else 0, A_h being the softmax attention (over the full padded grid)
cropped to the valid keys; W = mean over heads of A', normalised to row sum 1; out = W @ features.

:class:`SamAggregation` is fused into SAM's image encoder: it observes the last block
(``models.sam.AttentionObserver``) and consumes each block of softmax attention rows while the block
computes them for its own output, so the attention is computed once per frame, and neither the
(heads, N, N) attention nor the cosine map is ever held whole (N = hs * ws, 4096 for a square
image: 805 MB each in fp32). Per chunk of c queries one (heads, c, N) block is built: the cosine
block, turned in place into the mask and then the kept attention (the attention rows, cropped to
the valid keys by a strided view, not a copy). The mean over heads is a sum (the 1/heads factor
cancels in the row normalisation) and tau comes from the per-head means of the unit value vectors
(mean_k u_m . u_k = u_m . mean_k u_k), so no (c, N) mean over the cosine block is needed.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

NEGATIVE_TAU_FALLBACK = 0.6
"""Threshold replacing a negative tau when ``refine_neg_cos`` is off (the reference's value)."""
TAU_CAP = 0.9
"""Upper bound of tau."""


def aggregation_chunk_bytes(heads: int, valid: tuple[int, int], chunk_size: int, element_size: int) -> int:
    """Bytes of the per-chunk block :class:`SamAggregation` holds at most: the (heads, c, N) kept
    attention of c queries (``chunk_size`` rounded down to whole rows of the valid grid, at least
    one row) over the N valid keys.
    """
    rows = max(1, min(chunk_size // valid[1], valid[0]))
    count = valid[0] * valid[1]
    return heads * rows * valid[1] * count * element_size


def resize_features(features: torch.Tensor, valid: tuple[int, int]) -> torch.Tensor:
    """The spliced map resized bilinearly to the valid SAM grid: (D, Hg, Wg) -> (D, hs, ws)."""
    # channels as the batch: the same bilinear resize without the (1, D, Hg, Wg) input's channels-last copy
    return F.interpolate(features[:, None], size=valid, mode='bilinear', align_corners=False)[:, 0]


class SamAggregation:
    """Aggregates a dense feature map with SAM's last-block attention while SAM computes it.

    A ``models.sam.AttentionObserver``: pass it to ``SamEncoder.encode``, then read :meth:`result`.
    Besides one per-chunk block (:func:`aggregation_chunk_bytes`) it holds the unit values
    (heads, N, hd), the resized features (D, N) and the output (D, N): at 64 x 64 SAM tokens
    (ViT-B: 12 heads, D = 768, fp32) 38 MB.

    The reference always keeps a query's own key (its cosine 1 exceeds tau <= 0.9 and its softmax
    weight is positive), so a row sums to 0 only when that weight underflows (fp16) or the value
    vector is zero; the reference then divides 0 by 0 (NaN). Here such a row keeps its own feature.

    Attributes:
        seconds: time spent in :meth:`start` and :meth:`rows` (host clock: on CUDA, launch time).
    """

    @torch.inference_mode()
    def __init__(self, features: torch.Tensor, valid: tuple[int, int], cos_fac: float, refine_neg_cos: bool,
                 chunk_size: int) -> None:
        """Args:
        features: (D, Hg, Wg) spliced CLIP tokens; resized bilinearly to the valid SAM grid.
        valid: (hs, ws) unpadded SAM token grid (``SamEncoder.token_grid``).
        cos_fac: factor on the mean value cosine giving each query's threshold tau.
        refine_neg_cos: keep a negative tau (False: a negative tau becomes 0.6).
        chunk_size: queries per chunk, rounded down to whole rows of the valid grid (at least
            one row); bounds memory, the result does not depend on it.
        """
        if chunk_size < 1:
            raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
        self.valid = valid
        self.cos_fac = cos_fac
        self.refine_neg_cos = refine_neg_cos
        self.chunk_rows = max(1, chunk_size // valid[1])
        self.seconds = 0.0
        self.tokens = resize_features(features, valid).reshape(features.shape[0], valid[0] * valid[1])  # (D, N)
        self.out = torch.empty_like(self.tokens)
        self.unit: torch.Tensor | None = None
        self.done_rows = 0

    @torch.inference_mode()
    def start(self, v: torch.Tensor) -> None:
        """Take the values of SAM's last block.

        Args:
            v: (heads, G, G', hd) values of SAM's whole padded grid.
        """
        begin = time.perf_counter()
        valid_h, valid_w = self.valid
        heads = v.shape[0]
        if v.shape[1] < valid_h or v.shape[2] < valid_w:
            raise ValueError(f'valid grid {self.valid} exceeds the attention grid {tuple(v.shape[1:3])}')
        # (heads, N, hd)
        self.unit = F.normalize(v[:, :valid_h, :valid_w].reshape(heads, valid_h * valid_w, -1), dim=-1)
        self.unit_t = self.unit.transpose(1, 2)  # (heads, hd, N)
        # tau_m = cos_fac * mean_h mean_k (u_hm . u_hk) = cos_fac / heads * sum_h u_hm . (mean_k u_hk)
        self.key_mean = self.unit.mean(dim=1).unsqueeze(-1).mul_(self.cos_fac / heads)  # (heads, hd, 1)
        self.grid = (v.shape[1], v.shape[2])
        self.done_rows = 0
        self.seconds += time.perf_counter() - begin

    @torch.inference_mode()
    def rows(self, rows: slice, attention: torch.Tensor) -> None:
        """Aggregate one block of query rows.

        Args:
            rows: image rows of the queries.
            attention: (heads, len(rows) * G', G * G') their softmax attention over the whole padded grid.
        """
        if self.unit is None:
            raise RuntimeError('SamAggregation.rows before start')
        begin = time.perf_counter()
        valid_h, valid_w = self.valid
        grid_h, grid_w = self.grid
        heads = attention.shape[0]
        row_count = rows.stop - rows.start
        # (heads, query row, query column, key row, key column), valid queries and keys: a view
        attention = attention.view(heads, row_count, grid_w, grid_h, grid_w)[:, :, :valid_w, :valid_h, :valid_w]
        for first in range(rows.start, min(rows.stop, valid_h), self.chunk_rows):
            last = min(first + self.chunk_rows, rows.stop, valid_h)
            self._aggregate(first, last, attention[:, first - rows.start:last - rows.start])
        self.done_rows = max(self.done_rows, min(rows.stop, valid_h))
        self.seconds += time.perf_counter() - begin

    def _aggregate(self, first: int, last: int, attention: torch.Tensor) -> None:
        """Output tokens of valid rows ``first..last``; ``attention`` (heads, rows, ws, hs, ws)."""
        valid_h, valid_w = self.valid
        heads = self.unit.shape[0]
        start, stop = first * valid_w, last * valid_w
        queries = self.unit[:, start:stop]  # (heads, c, hd)
        tau = torch.bmm(queries, self.key_mean).sum(dim=0)  # (c, 1)
        if not self.refine_neg_cos:
            tau = torch.where(tau < 0, torch.full_like(tau, NEGATIVE_TAU_FALLBACK), tau)
        tau = tau.clamp_(max=TAU_CAP)
        kept = torch.bmm(queries, self.unit_t)  # (heads, c, N): cosine ...
        kept.gt_(tau)  # ... then 1 where it exceeds tau, else 0 ...
        kept.view(heads, last - first, valid_w, valid_h, valid_w).mul_(attention)  # ... then the kept attention
        weights = kept.sum(dim=0)  # (c, N); the mean's 1/heads cancels below
        del kept
        total = weights.sum(dim=-1, keepdim=True)
        empty = total == 0
        weights.div_(total.masked_fill_(empty, 1))
        local = torch.arange(stop - start, device=weights.device)
        weights[local, start + local] += empty[:, 0].to(weights.dtype)
        self.out[:, start:stop] = self.tokens @ weights.t().to(self.tokens.dtype)

    def result(self) -> torch.Tensor:
        """(D, hs, ws) aggregated features, dtype of the input features."""
        if self.done_rows < self.valid[0]:
            raise RuntimeError(f'SamAggregation: attention of {self.done_rows} of {self.valid[0]} valid rows seen')
        return self.out.view(-1, *self.valid)


def masked_aggregation(attention: torch.Tensor, v: torch.Tensor, features: torch.Tensor, key_mask: torch.Tensor,
                       cos_fac: torch.Tensor, refine_neg_cos: torch.Tensor) -> torch.Tensor:
    """:class:`SamAggregation` on the whole padded grid at once, the valid keys given by a mask (exported graphs).

    The same rule with every (heads, N, N) block held whole, so that one static graph serves every aspect ratio:
    tau from the mean of the unit values over the masked keys, the kept attention multiplied by the key mask. A
    query outside the valid grid gets a value the caller crops away.

    Args:
        attention: (heads, N, N) softmax attention over the padded grid (N = G * G').
        v: (heads, N, hd) values.
        features: (D, N) features resized to the valid grid, zero-padded to the padded grid.
        key_mask: (N,) 1.0 for a valid key, else 0.0.
        cos_fac: (1,) threshold factor.
        refine_neg_cos: (1,) 1.0 to keep a negative tau, 0.0 for the fallback.

    Returns:
        (D, N) aggregated features.
    """
    heads = v.shape[0]
    unit = F.normalize(v, dim=-1)
    key_mean = (unit * key_mask[:, None]).sum(dim=1, keepdim=True) / key_mask.sum()  # (heads, 1, hd)
    tau = (unit * key_mean).sum(dim=-1).sum(dim=0) * (cos_fac / heads)  # (N,)
    tau = torch.where((tau < 0) & (refine_neg_cos < 0.5), torch.full_like(tau, NEGATIVE_TAU_FALLBACK), tau)
    tau = tau.clamp(max=TAU_CAP)
    kept = (unit @ unit.transpose(1, 2) > tau[None, :, None]).to(attention.dtype) * attention
    weights = (kept * key_mask).sum(dim=0)  # (N, N)
    total = weights.sum(dim=-1, keepdim=True)
    empty = (total == 0).to(weights.dtype)
    weights = weights / (total + empty)
    return features @ weights.t() + features * empty[:, 0]
