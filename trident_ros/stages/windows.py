"""Sliding windows for the CLIP/DINO branch, and the DINO-guided last CLIP block.

The reference evaluation resizes the image twice before cutting windows: the dataset pipeline
(mmcv ``imrescale``) rescales the uint8 image with ``cv2.resize(..., INTER_LINEAR)`` to a short
side of 448 with the long side capped at 2048, then the model resizes it again (bilinear, on
floats) so both sides are multiples of the patch size and at least the crop size. Windows of
``crop`` pixels step by ``stride``; the last row and column are aligned to the image border.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

REFERENCE_PATCH = 16
"""The reference's patch size (ViT-B/16), the default where a caller names none; the pipeline passes the loaded
models' own."""


def _bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) floating -> (3, h, w) bilinear with half-pixel centres (cv2's INTER_LINEAR formula)."""
    return F.interpolate(image[None], size=size, mode='bilinear', align_corners=False, antialias=False)[0]


def short_side_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """(h, w) after the reference's keep-ratio rescale (mmcv ``rescale_size``).

    Short side ``short_side``, long side at most ``max_long_side``, each side ``int(x * f + 0.5)``
    and at least 1 (an extreme aspect ratio such as 1x10000 would otherwise round its short side to 0).
    """
    factor = min(max_long_side / max(height, width), short_side / min(height, width))
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def window_input_size(height: int, width: int, crop: int, patch: int = REFERENCE_PATCH) -> tuple[int, int]:
    """(h, w) the windows are cut from (the reference's ``preprocess_image``).

    The long side rounded up to a multiple of ``patch``, the other side scaled alike (truncated)
    then rounded up, each side at least ``crop``.

    An image whose sides are already multiples of ``patch`` (and at least ``crop``) keeps its size.
    """
    if height % patch == 0 and width % patch == 0 and min(height, width) >= crop:
        return height, width
    longer = max(height, width)
    target = -(-longer // patch) * patch
    new_h = int(height * target / longer)
    new_w = int(width * target / longer)
    new_h, new_w = -(-new_h // patch) * patch, -(-new_w // patch) * patch
    return max(new_h, crop), max(new_w, crop)


def rescale_uint8(image: np.ndarray, short_side: int, max_long_side: int) -> np.ndarray:
    """The reference's first rescale (mmcv ``imrescale``): ``cv2.resize`` INTER_LINEAR on uint8.

    Args:
        image: (H, W, 3) uint8.
        short_side: target short side.
        max_long_side: cap on the long side.

    Returns:
        (h, w, 3) uint8 with (h, w) from :func:`short_side_size` (OpenCV's fixed-point bilinear, so
        bit-identical to the reference); ``image`` itself when the size does not change.
    """
    height, width = image.shape[:2]
    size = short_side_size(height, width, short_side, max_long_side)
    if size == (height, width):
        return image
    return cv2.resize(np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_for_windows(image: torch.Tensor, short_side: int, max_long_side: int, crop: int,
                       device: torch.device | str | None = None, patch: int = REFERENCE_PATCH) -> torch.Tensor:
    """Resize an image to the size the sliding windows are cut from (the reference's two resizes).

    Args:
        image: (3, H, W) uint8 or floating RGB, values 0..255, on any device.
        short_side: target short side of the first rescale (0: skip it, keep the original size).
        max_long_side: cap on the long side of the first rescale.
        crop: window size; the result is at least this on both sides.
        device: where the result (and the second resize) lives; default: the image's device.
        patch: the result's sides are multiples of it.

    Returns:
        (3, H', W') floating (float32 for uint8 input), values 0..255, H' and W' multiples of ``patch`` and
        >= ``crop``. E.g. 480x640 -> 448x597 -> 464x608.

    A uint8 image gets the first rescale from :func:`rescale_uint8` on the CPU (bit-identical to
    the reference's data pipeline); a floating one from torch's bilinear without antialiasing (the
    same INTER_LINEAR formula, exact instead of fixed-point). The second resize is torch's bilinear
    on floats, as in the reference's model.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f'expected a (3, H, W) image, got {tuple(image.shape)}')
    device = image.device if device is None else torch.device(device)
    if short_side > 0 and not image.is_floating_point():
        rescaled = rescale_uint8(image.permute(1, 2, 0).cpu().numpy(), short_side, max_long_side)
        out = torch.from_numpy(rescaled).to(device).permute(2, 0, 1).float()
    else:
        out = image.to(device)
        out = out if out.is_floating_point() else out.float()
        if short_side > 0:
            size = short_side_size(out.shape[1], out.shape[2], short_side, max_long_side)
            if size != tuple(out.shape[1:]):
                out = _bilinear(out, size)
    size = window_input_size(out.shape[1], out.shape[2], crop, patch)
    if size != tuple(out.shape[1:]):
        out = _bilinear(out, size)
    return out


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding-window boxes ``(y0, x0, y1, x1)`` in pixels, row by row.

    ``ceil((side - crop) / stride) + 1`` windows per side, the last one aligned to the border; a
    side not longer than ``crop`` gets one window covering it.
    """
    def spans(side: int) -> list[tuple[int, int]]:
        count = max(side - crop + stride - 1, 0) // stride + 1
        ends = [min(index * stride + crop, side) for index in range(count)]
        return [(max(end - crop, 0), end) for end in ends]

    return [(y0, x0, y1, x1) for y0, y1 in spans(height) for x0, x1 in spans(width)]


def cut_windows(image: np.ndarray, short_side: int, max_long_side: int, crop: int | None, stride: int, patch: int,
                device: torch.device) -> tuple[torch.Tensor, list[tuple[int, int, int, int]], torch.Tensor]:
    """Cut the sliding windows of a frame, as every method's image side does.

    Args:
        image: (H, W, 3) uint8 RGB.
        short_side: short side of the first rescale (0: the original size).
        max_long_side: cap on its long side.
        crop: window side in pixels; None: one window, the whole resized image.
        stride: window step in pixels.
        patch: the resized image's sides (and so the boxes) are multiples of it.
        device: where the crops live.

    Returns:
        The resized image (3, H', W'), its window boxes ``(y0, x0, y1, x1)`` and the crops (B, 3, h, w) float32 in
        [0, 1], on ``device``.
    """
    rgb = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # on the CPU: cv2 rescales it
    resized = resize_for_windows(rgb, short_side, max_long_side, patch if crop is None else crop, device, patch)
    if crop is None:
        boxes = [(0, 0, resized.shape[1], resized.shape[2])]
    else:
        boxes = window_boxes(resized.shape[1], resized.shape[2], crop, stride)
    crops = torch.stack([resized[:, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes]).float().div_(255)
    return resized, boxes, crops


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
    """Normalise crops for an encoder: (B, 3, H, W) in [0, 1] -> ``(x - mean) / std`` in ``dtype``."""
    mean_t = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return ((images - mean_t) / std_t).to(dtype)


def dino_guided_attention(dino: torch.Tensor, values: torch.Tensor, clip_grid: tuple[int, int],
                          dino_grid: tuple[int, int], beta: float, gamma: float,
                          mean_per_crop: bool = False) -> torch.Tensor:
    """CLIP's last attention with weights from DINO patch similarity (all crops of a frame at once).

    S = cosine similarity of DINO patches; S' = (S - mean(S) * beta) * gamma with mean(S) one
    scalar over all crops together (Trident) or one per crop (``mean_per_crop``: ProxyCLIP, which
    runs one window at a time); entries below 0 are masked; row softmax; the CLIP values are
    resized bilinearly to the DINO grid; output = softmax(S') @ v per head. The caller applies
    the block's ``out_proj``.

    A row with no entry >= 0 (only possible when beta * mean(S) > 1, e.g. a featureless frame, or
    for a zero DINO feature) would be all -inf and give NaN in the reference; here it keeps its
    largest entries instead (its own patch, whose cosine is the row maximum 1). Rows with an
    entry >= 0 are exactly the reference's.

    Args:
        dino: (B, Nd, C) DINO patch features, Nd = dh * dw.
        values: (B, heads, Nc, hd) CLIP last-block values, Nc = gh * gw.
        clip_grid: (gh, gw) token grid of the values.
        dino_grid: (dh, dw) token grid of the DINO features.
        beta: mean offset factor.
        gamma: sharpening factor.
        mean_per_crop: take mean(S) per crop instead of over all crops.

    Returns:
        (B, Nd, heads * hd), heads concatenated, dtype of ``values``.
    """
    unit = F.normalize(dino, dim=-1)
    similarity = unit @ unit.transpose(1, 2)  # (B, Nd, Nd)
    mean = similarity.mean(dim=(1, 2), keepdim=True) if mean_per_crop else similarity.mean()
    return guided_attention(similarity, values, clip_grid, dino_grid, mean * beta, gamma)


def guided_attention(similarity: torch.Tensor, values: torch.Tensor, clip_grid: tuple[int, int],
                     dino_grid: tuple[int, int], offset: torch.Tensor, gamma: float | torch.Tensor) -> torch.Tensor:
    """:func:`dino_guided_attention` from the DINO similarity and its offset (``beta * mean(S)``).

    Args:
        similarity: (B, Nd, Nd) cosine similarity of the DINO patches of each crop.
        values: (B, heads, Nc, hd) CLIP last-block values, Nc = gh * gw.
        clip_grid: (gh, gw) token grid of the values.
        dino_grid: (dh, dw) token grid of the DINO features.
        offset: ``beta * mean(S)``, a scalar or (B, 1, 1) (one per crop).
        gamma: sharpening factor (a float, or a tensor that broadcasts).

    Returns:
        (B, Nd, heads * hd), heads concatenated, dtype of ``values``.
    """
    batch, heads, tokens, head_dim = values.shape
    if tokens != clip_grid[0] * clip_grid[1] or similarity.shape[1] != dino_grid[0] * dino_grid[1]:
        raise ValueError(f'grids {clip_grid}/{dino_grid} do not match {tokens}/{similarity.shape[1]} tokens')
    logits = (similarity - offset) * gamma
    floor = logits.amax(dim=-1, keepdim=True).clamp(max=0)
    logits = logits.masked_fill(logits < floor, float('-inf'))
    weights = logits.softmax(dim=-1).to(values.dtype)
    if tuple(clip_grid) != tuple(dino_grid):
        grid = values.transpose(2, 3).reshape(batch * heads, head_dim, *clip_grid)
        grid = F.interpolate(grid, size=tuple(dino_grid), mode='bilinear', align_corners=False)
        values = grid.reshape(batch, heads, head_dim, -1).transpose(2, 3)
    # one weight matrix for all heads: a single (Nd, Nd) @ (Nd, heads * hd) product per crop, no
    # (B, heads, Nd, Nd) broadcast copy of the weights
    return weights @ values.transpose(1, 2).reshape(batch, -1, heads * head_dim)
