"""Splicing crop token maps into one map, against a per-crop accumulation loop."""
from __future__ import annotations

import pytest
import torch

from trident_ros.stages.splice import splice_windows
from trident_ros.stages.windows import window_boxes


def naive_splice(tokens: torch.Tensor, boxes, out_size, patch: int) -> torch.Tensor:
    total = torch.zeros(tokens.shape[1], *out_size, dtype=torch.float64)
    count = torch.zeros(1, *out_size, dtype=torch.float64)
    for crop, (y0, x0, y1, x1) in zip(tokens, boxes, strict=True):
        total[:, y0 // patch:y1 // patch, x0 // patch:x1 // patch] += crop.double()
        count[:, y0 // patch:y1 // patch, x0 // patch:x1 // patch] += 1
    return total / count


@pytest.mark.parametrize('height, width', [(464, 608), (336, 336), (336, 800)])
def test_splice_matches_loop(height: int, width: int) -> None:
    torch.manual_seed(0)
    boxes = window_boxes(height, width, 336, 224)
    tokens = torch.randn(len(boxes), 8, 21, 21)
    out = splice_windows(tokens, boxes, (height // 16, width // 16))
    assert out.shape == (8, height // 16, width // 16)
    torch.testing.assert_close(out, naive_splice(tokens, boxes, (height // 16, width // 16), 16).float())


def test_overlap_is_averaged() -> None:
    boxes = [(0, 0, 32, 32), (0, 16, 32, 48)]
    tokens = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    out = splice_windows(tokens, boxes, (2, 3))
    assert out.tolist() == [[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]


def test_other_patch_size_and_dtype() -> None:
    torch.manual_seed(1)
    boxes = window_boxes(64, 96, 48, 32)
    tokens = torch.randn(len(boxes), 4, 6, 6, dtype=torch.float16)
    out = splice_windows(tokens, boxes, (8, 12), patch=8)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), naive_splice(tokens, boxes, (8, 12), 8), atol=1e-3, rtol=1e-3)


def test_rejects_boxes_of_another_size() -> None:
    with pytest.raises(ValueError):
        splice_windows(torch.zeros(1, 4, 2, 2), [(0, 0, 48, 48)], (3, 3))
    with pytest.raises(ValueError):
        splice_windows(torch.zeros(1, 4, 2, 2), [(16, 16, 48, 48)], (2, 2))
