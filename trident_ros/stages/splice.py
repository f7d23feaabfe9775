"""Splice the token maps of sliding-window crops into one map of the whole (resized) image."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from trident_ros.stages.windows import REFERENCE_PATCH


def splice_windows(tokens: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], out_size: tuple[int, int],
                   patch: int = REFERENCE_PATCH) -> torch.Tensor:
    """Place every crop's token map at its patch coordinates, averaging where crops overlap.

    Args:
        tokens: (B, D, gh, gw) token maps of the B crops.
        boxes: B boxes ``(y0, x0, y1, x1)`` in pixels (multiples of ``patch``), each ``gh * patch``
            by ``gw * patch``.
        out_size: (Hg, Wg) token grid of the whole image.
        patch: pixels per token.

    Returns:
        (D, Hg, Wg), dtype of ``tokens`` (summed in float32); a cell no crop covers is 0.
    """
    count, dim, grid_h, grid_w = tokens.shape
    if len(boxes) != count:
        raise ValueError(f'{len(boxes)} boxes for {count} token maps')
    box = torch.as_tensor(boxes, dtype=torch.long).reshape(count, 4)
    if bool((box % patch).any()) or bool(((box[:, 2:] - box[:, :2]) != torch.tensor([grid_h, grid_w]) * patch).any()):
        raise ValueError(f'boxes must be multiples of {patch} pixels and {grid_h}x{grid_w} patches in size')
    out_h, out_w = out_size
    if bool((box[:, 2] // patch > out_h).any()) or bool((box[:, 3] // patch > out_w).any()):
        raise ValueError(f'a box lies outside the {out_h}x{out_w} token grid')
    box = box.to(tokens.device) // patch
    rows = box[:, 0, None] + torch.arange(grid_h, device=tokens.device)  # (B, gh)
    cols = box[:, 1, None] + torch.arange(grid_w, device=tokens.device)  # (B, gw)
    index = (rows[:, :, None] * out_w + cols[:, None, :]).reshape(-1)  # (B * gh * gw,)
    flat = tokens.permute(1, 0, 2, 3).reshape(dim, -1).float()
    total = flat.new_zeros(dim, out_h * out_w).index_add_(1, index, flat)
    hits = torch.bincount(index, minlength=out_h * out_w).clamp_(min=1)
    return (total / hits).to(tokens.dtype).reshape(dim, out_h, out_w)


def splice_unit_features(features: torch.Tensor, grid: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]],
                         token_grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Per-window patch features ``(B, gh*gw, E)`` spliced into ``(E, Hg, Wg)`` (averaged where windows overlap)."""
    return splice_windows(features.transpose(1, 2).reshape(len(boxes), -1, *grid), boxes, token_grid, patch)
