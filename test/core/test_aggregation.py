"""SAM-attention aggregation, fed block by block as SAM's last block computes its attention, against
the reference's whole-matrix formula (get_sam_sim).

Memory is not measured here (RSS is too coarse on tiny inputs); instead a torch dispatch mode
records every tensor the aggregation creates, and the largest must be a chunk-sized block.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trident_ros.stages.sam_aggregation import SamAggregation, aggregation_chunk_bytes


@dataclass
class AttentionCapture:
    """Last-block q, k, v of a G x G grid; attention rows softmaxed over the whole padded grid."""

    q: torch.Tensor  # (heads, G, G, hd)
    k: torch.Tensor
    v: torch.Tensor
    valid: tuple[int, int]

    def full_attention(self) -> torch.Tensor:
        heads = self.q.shape[0]
        q = self.q.reshape(heads, -1, self.q.shape[-1])
        k = self.k.reshape(heads, -1, self.k.shape[-1])
        return torch.softmax(q @ k.transpose(1, 2) * q.shape[-1] ** -0.5, dim=-1)


def make_capture(grid: int, valid: tuple[int, int], heads: int = 3, head_dim: int = 4, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> AttentionCapture:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(heads, grid, grid, head_dim, generator=generator, dtype=dtype) for _ in range(3))
    return AttentionCapture(q, k, v, valid)


def aggregate(features: torch.Tensor, capture: AttentionCapture, cos_fac: float, refine_neg_cos: bool, chunk: int,
              rows_per_block: int = 1) -> torch.Tensor:
    """Drive a SamAggregation as SamChunkedAttention does: the values, then the attention of
    ``rows_per_block`` image rows of queries at a time, in order.
    """
    grid = capture.v.shape[2]
    attention = capture.full_attention()
    aggregation = SamAggregation(features, capture.valid, cos_fac, refine_neg_cos, chunk)
    aggregation.start(capture.v)
    for first in range(0, capture.v.shape[1], rows_per_block):
        rows = slice(first, min(first + rows_per_block, capture.v.shape[1]))
        aggregation.rows(rows, attention[:, rows.start * grid:rows.stop * grid])
    return aggregation.result()


def naive_aggregation(features: torch.Tensor, capture: AttentionCapture, cos_fac: float, refine_neg_cos: bool,
                      tau_cap: float = 0.9) -> torch.Tensor:
    """The reference: crop attention (after the full softmax) and values to the valid grid, whole matrices."""
    hs, ws = capture.valid
    heads, grid = capture.v.shape[:2]
    attn = capture.full_attention().reshape(heads, grid, grid, grid, grid)[:, :hs, :ws, :hs, :ws]
    attn = attn.reshape(heads, hs * ws, hs * ws)
    v = F.normalize(capture.v[:, :hs, :ws].reshape(heads, hs * ws, -1), dim=-1)
    sim = v @ v.transpose(1, 2)
    tau = cos_fac * sim.mean(dim=0, keepdim=True).mean(dim=-1, keepdim=True)
    if not refine_neg_cos:
        tau = torch.where(tau < 0.0, 0.6, tau)
    tau = torch.where(tau > tau_cap, tau_cap, tau)
    refined = torch.where(sim > tau, attn, torch.zeros_like(attn)).mean(dim=0)
    weights = refined / refined.sum(dim=-1, keepdim=True)
    dense = F.interpolate(features[None], size=(hs, ws), mode='bilinear', align_corners=False)[0]
    return (weights @ dense.reshape(features.shape[0], -1).T).T.reshape(-1, hs, ws)


@pytest.mark.parametrize('chunk, rows_per_block', [(1, 1), (7, 1), (14, 3), (30, 2), (35, 8), (1000, 3)])
@pytest.mark.parametrize('refine_neg_cos', [True, False])
def test_equals_naive(chunk: int, rows_per_block: int, refine_neg_cos: bool) -> None:
    capture = make_capture(grid=8, valid=(5, 7))
    features = torch.randn(6, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = aggregate(features, capture, 1.2, refine_neg_cos, chunk, rows_per_block)
    assert out.shape == (6, 5, 7)
    torch.testing.assert_close(out, naive_aggregation(features, capture, 1.2, refine_neg_cos))


def test_full_grid_without_padding() -> None:
    capture = make_capture(grid=6, valid=(6, 6), seed=2)
    features = torch.randn(4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(aggregate(features, capture, 1.2, True, 8),
                               naive_aggregation(features, capture, 1.2, True))


def test_negative_tau_rule() -> None:
    """Two opposite clusters of 2-d values: the 5 minority queries have a negative mean cosine."""
    capture = make_capture(grid=4, valid=(4, 4), heads=2, head_dim=2, seed=3)
    angle = torch.linspace(-0.3, 0.3, 16, dtype=torch.float64)
    angle[:5] = torch.pi + torch.tensor([-1.2, -0.6, 0.0, 0.6, 1.2], dtype=torch.float64)
    direction = torch.stack([angle.cos(), angle.sin()], dim=-1).reshape(1, 4, 4, 2)
    capture.v = direction * torch.rand(2, 4, 4, 1, dtype=torch.float64).add(0.5)
    features = torch.randn(3, 4, 4, dtype=torch.float64)
    keep_negative = aggregate(features, capture, 1.2, True, 5)
    replace_negative = aggregate(features, capture, 1.2, False, 5)
    torch.testing.assert_close(keep_negative, naive_aggregation(features, capture, 1.2, True))
    torch.testing.assert_close(replace_negative, naive_aggregation(features, capture, 1.2, False))
    minority = torch.zeros(16, dtype=torch.bool)
    minority[:5] = True
    minority = minority.reshape(4, 4)
    # a minority query keeps minority keys with cosine 0.36 under tau < 0, not under tau = 0.6
    assert not torch.allclose(keep_negative[:, minority], replace_negative[:, minority])
    torch.testing.assert_close(keep_negative[:, ~minority], replace_negative[:, ~minority])


def test_tau_cap() -> None:
    """Nearly parallel values: cos_fac * mean cosine > 1 would keep nothing; the 0.9 cap keeps them."""
    capture = make_capture(grid=4, valid=(3, 4), seed=4)
    capture.v = capture.v[:, :1, :1] + 0.05 * capture.v
    features = torch.randn(3, 3, 4, dtype=torch.float64)
    out = aggregate(features, capture, 1.2, True, 4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive_aggregation(features, capture, 1.2, True))
    assert torch.isnan(naive_aggregation(features, capture, 1.2, True, tau_cap=2.0)).all()


def test_softmax_is_over_padded_grid_and_values_are_cropped() -> None:
    capture = make_capture(grid=6, valid=(4, 5), seed=5)
    features = torch.randn(3, 4, 5, dtype=torch.float64)
    base = aggregate(features, capture, 1.2, True, 6)
    capture.v[:, 4:] = 0  # padded values take no part
    capture.v[:, :, 5:] = 0
    torch.testing.assert_close(aggregate(features, capture, 1.2, True, 6), base)
    capture.k[:, 5:] *= 3  # padded keys change the softmax normalisation of every row
    assert not torch.allclose(aggregate(features, capture, 1.2, True, 6), base)


def test_empty_row_keeps_own_feature() -> None:
    capture = make_capture(grid=4, valid=(4, 4), seed=6)
    capture.v[:, 1, 2] = 0  # cosine 0 with everything, tau 0: nothing is kept for this query
    features = torch.randn(3, 4, 4, dtype=torch.float64)
    out = aggregate(features, capture, 1.2, True, 3)
    torch.testing.assert_close(out[:, 1, 2], features[:, 1, 2])
    naive = naive_aggregation(features, capture, 1.2, True)
    assert torch.isnan(naive[:, 1, 2]).all()
    others = torch.ones(4, 4, dtype=torch.bool)
    others[1, 2] = False
    torch.testing.assert_close(out[:, others], naive[:, others])


def test_fp16_keeps_dtype() -> None:
    capture = make_capture(grid=4, valid=(4, 3), seed=7, dtype=torch.float32)
    features = torch.randn(5, 4, 3)
    full = aggregate(features, capture, 1.2, True, 5)
    half_capture = AttentionCapture(capture.q.half(), capture.k.half(), capture.v.half(), capture.valid)
    half = aggregate(features.half(), half_capture, 1.2, True, 5, rows_per_block=2)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=2e-2)


class LargestOutput(TorchDispatchMode):
    """The most elements of any new tensor a torch op returned while active (views not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.mark.parametrize('chunk, rows', [(5, 1), (14, 2), (21, 3)])
def test_holds_only_chunk_sized_blocks(chunk: int, rows: int) -> None:
    """Largest new tensor: the (heads, c, N) kept attention of c = ``rows`` whole valid rows of 7
    queries (here bigger than the unit values (heads, N, hd) and the output (D, N)); the naive
    formula holds (heads, N, N) matrices.
    """
    capture = make_capture(grid=8, valid=(6, 7), seed=8)
    features = torch.randn(6, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    attention = capture.full_attention()
    aggregation = SamAggregation(features, capture.valid, 1.2, True, chunk)
    with LargestOutput() as largest:
        aggregation.start(capture.v)
        for first in range(0, 8, 4):  # SAM's blocks of 4 image rows, each split into chunks
            aggregation.rows(slice(first, first + 4), attention[:, first * 8:(first + 4) * 8])
    block = 3 * rows * 7 * 42
    assert largest.numel == block
    assert aggregation_chunk_bytes(3, (6, 7), chunk, 8) == block * 8
    with LargestOutput() as whole:
        expected = naive_aggregation(features, capture, 1.2, True)
    assert whole.numel >= 3 * 42 * 42 > block
    torch.testing.assert_close(aggregation.result(), expected)


def test_misuse_is_an_error() -> None:
    capture = make_capture(grid=4, valid=(3, 4), seed=10)
    features = torch.randn(3, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match='chunk_size'):
        SamAggregation(features, capture.valid, 1.2, True, 0)
    aggregation = SamAggregation(features, capture.valid, 1.2, True, 4)
    attention = capture.full_attention()
    with pytest.raises(RuntimeError, match='before start'):
        aggregation.rows(slice(0, 1), attention[:, :4])
    aggregation.start(capture.v)
    aggregation.rows(slice(0, 2), attention[:, :8])
    with pytest.raises(RuntimeError, match='2 of 3 valid rows'):
        aggregation.result()
    with pytest.raises(ValueError, match='exceeds'):
        SamAggregation(features, (5, 4), 1.2, True, 4).start(capture.v)
