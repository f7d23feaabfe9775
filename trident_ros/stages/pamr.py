"""Pixel-adaptive mask refinement (PAMR; Araslanov and Roth, CVPR 2020), as NACLIP and ResCLIP use it.

The image side, :func:`pamr_affinity`, turns an image into per-pixel weights over its 8
neighbours at each dilation: ``w_p = softmax_p(-mean_c |I_c - I_c,p| / (0.1 std_c))``, ``std_c``
the (unbiased) standard deviation of channel ``c`` over the pixel and all its neighbours at all
dilations, borders replicated. The vocabulary side, :func:`pamr_refine`, iterates
``m <- sum_p w_p m_p`` on logit maps. Both are per channel, so names can be refined in chunks.
Defaults (NACLIP ``naclip.py``, ResCLIP ``clip/model.py``): 10 iterations, dilations 8 and 16.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch idiom)

PAMR_ITERATIONS = 10
PAMR_DILATIONS = (8, 16)
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _neighbours(maps: torch.Tensor, dilation: int, centre: bool = False) -> list[torch.Tensor]:
    """The 8 (9 with ``centre``) neighbour maps of ``(B, C, H, W)`` at ``dilation``, borders replicated."""
    height, width = maps.shape[-2:]
    padded = F.pad(maps, (dilation,) * 4, mode='replicate')
    offsets = ((0, 0),) + _OFFSETS if centre else _OFFSETS
    return [padded[..., dilation + dy * dilation:dilation + dy * dilation + height,
                   dilation + dx * dilation:dilation + dx * dilation + width] for dy, dx in offsets]


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> torch.Tensor:
    """PAMR's neighbour weights of an image.

    Args:
        image: ``(B, C, H, W)`` float (any per-channel affine scaling gives the same weights).
        dilations: neighbourhood dilations in pixels.

    Returns:
        ``(B, 8 * len(dilations), H, W)`` float32, summing to 1 over dim 1.
    """
    image = image.float()
    every = torch.stack([n for d in dilations for n in _neighbours(image, d, centre=True)], dim=2)
    std = every.std(dim=2)  # (B, C, H, W)
    differences = torch.stack([(image - n).abs() for d in dilations for n in _neighbours(image, d)], dim=2)
    logits = -(differences / (1e-8 + 0.1 * std[:, :, None])).mean(dim=1)  # (B, P, H, W)
    return logits.softmax(dim=1)


def pamr_refine(logits: torch.Tensor, affinity: torch.Tensor, dilations: Sequence[int] = PAMR_DILATIONS,
                iterations: int = PAMR_ITERATIONS) -> torch.Tensor:
    """Iterate ``m <- sum_p w_p m_p`` on logit maps.

    Args:
        logits: ``(B, K, H, W)`` maps at the affinity's size.
        affinity: ``(B, P, H, W)`` from :func:`pamr_affinity` with the same ``dilations``.
        dilations: as for the affinity.
        iterations: refinement steps.

    Returns:
        ``(B, K, H, W)`` float32.
    """
    maps = logits.float()
    weights = affinity.float().unbind(dim=1)
    for _ in range(iterations):
        neighbours = [n for d in dilations for n in _neighbours(maps, d)]
        maps = sum(w[:, None] * n for w, n in zip(weights, neighbours, strict=True))
    return maps
