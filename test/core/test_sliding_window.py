"""Window input size, window boxes and DINO-guided attention, against the reference's formulas."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from trident_ros.stages.windows import (
    dino_guided_attention,
    rescale_uint8,
    resize_for_windows,
    short_side_size,
    window_boxes,
    window_input_size,
)


def test_design_example_640x480() -> None:
    assert short_side_size(480, 640, 448, 2048) == (448, 597)
    assert window_input_size(448, 597, 336) == (464, 608)


@pytest.mark.parametrize('size, expected', [
    ((480, 640), (464, 608)),
    ((640, 480), (608, 464)),
    ((448, 448), (448, 448)),      # already a multiple of 16 and large enough: unchanged
    ((100, 1000), (336, 2048)),    # long side capped at 2048 -> 205 x 2048 -> 208 -> at least the crop
    ((375, 500), (464, 608)),      # 448 x 597 after the first rescale, as 480 x 640
])
def test_resize_for_windows_sizes(size: tuple[int, int], expected: tuple[int, int]) -> None:
    image = torch.zeros(3, *size, dtype=torch.uint8)
    out = resize_for_windows(image, 448, 2048, 336)
    assert out.shape == (3, *expected)
    assert out.dtype == torch.float32


@pytest.mark.parametrize('size, first, expected', [
    ((1, 10_000), (1, 2048), (336, 2048)),   # int(1 * 0.2048 + 0.5) = 0 would be an empty image
    ((10_000, 1), (2048, 1), (2048, 336)),
    ((2, 3000), (1, 2048), (336, 2048)),     # int(2 * 2048 / 3000 + 0.5) = 1
])
def test_extreme_aspect_ratios_keep_at_least_one_pixel(size, first, expected) -> None:
    height, width = size
    factor = min(2048 / max(size), 448 / min(size))  # the reference formula, then at least 1
    assert short_side_size(height, width, 448, 2048) == first == (max(int(height * factor + 0.5), 1),
                                                                   max(int(width * factor + 0.5), 1))
    out = resize_for_windows(torch.full((3, height, width), 77, dtype=torch.uint8), 448, 2048, 336)
    assert out.shape == (3, *expected)
    torch.testing.assert_close(out, torch.full_like(out, 77.0))  # a constant image stays constant


def test_resize_without_short_side_keeps_original_then_rounds() -> None:
    image = torch.rand(3, 100, 130) * 255
    out = resize_for_windows(image, 0, 2048, 64)
    # long side 130 -> 144; short side int(100 * 144 / 130) = 110 -> 112
    expected = F.interpolate(image[None], size=(112, 144), mode='bilinear', align_corners=False)[0]
    torch.testing.assert_close(out, expected)


def test_resize_matches_cv2_then_torch() -> None:
    """uint8: cv2 INTER_LINEAR to the short side (as the reference's data pipeline), then torch bilinear."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    first = cv2.resize(rgb, (149, 112), interpolation=cv2.INTER_LINEAR)  # 160x120 -> short side 112
    # then 112 x 149 -> long side 160, short side int(112 * 160 / 149) = 120 -> 128
    expected = F.interpolate(torch.from_numpy(first).permute(2, 0, 1)[None].float(), size=(128, 160),
                             mode='bilinear', align_corners=False)[0]
    out = resize_for_windows(torch.from_numpy(rgb).permute(2, 0, 1), 112, 2048, 96)
    assert out.shape == (3, 128, 160)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize('size', [(479, 641), (641, 479), (1, 7), (7, 1), (3, 2000), (333, 333), (97, 1013)])
def test_uint8_first_rescale_is_cv2_exactly(size: tuple[int, int]) -> None:
    """The first rescale is bit-identical to mmcv's imrescale.

    That is cv2.resize INTER_LINEAR on uint8 to (int(w * f + 0.5), int(h * f + 0.5)), f = min(2048 / long, 448 / short).
    """
    height, width = size
    rgb = np.random.default_rng(height * 7919 + width).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    factor = min(2048 / max(size), 448 / min(size))
    new_w, new_h = max(int(width * factor + 0.5), 1), max(int(height * factor + 0.5), 1)
    expected = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    first = rescale_uint8(rgb, 448, 2048)
    assert first.dtype == np.uint8 and np.array_equal(first, expected)
    # and the windows are cut from that image: with crop = 16 and sides already multiples of 16
    # there is no second resize, so the output is the cv2 image itself
    if new_h % 16 == 0 and new_w % 16 == 0:
        out = resize_for_windows(torch.from_numpy(rgb).permute(2, 0, 1), 448, 2048, 16)
        assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1).float())


def test_uint8_rescale_is_not_a_rounded_float_resize() -> None:
    """A float bilinear resize rounded afterwards differs from cv2's fixed-point result on many values."""
    rgb = np.random.default_rng(3).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    first = rescale_uint8(rgb, 448, 2048)
    rounded = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), size=(448, 597), mode='bilinear',
                            align_corners=False)[0].round().clamp(0, 255).permute(1, 2, 0).numpy().astype(np.uint8)
    assert first.shape == rounded.shape == (448, 597, 3)
    assert (first != rounded).mean() > 0.01
    assert np.array_equal(first, cv2.resize(rgb, (597, 448), interpolation=cv2.INTER_LINEAR))


def test_resize_for_windows_result_on_requested_device() -> None:
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    out = resize_for_windows(image, 48, 2048, 48, device='cpu')
    expected = cv2.resize(image.permute(1, 2, 0).numpy(), (64, 48), interpolation=cv2.INTER_LINEAR)
    assert out.device.type == 'cpu' and out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1).float())


def test_resize_downscale_float_is_plain_bilinear() -> None:
    image = torch.rand(3, 800, 1000, dtype=torch.float64) * 255
    out = resize_for_windows(image, 448, 2048, 336)
    first = F.interpolate(image[None], size=(448, 560), mode='bilinear', align_corners=False)[0]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, first)  # 448 x 560 is already a multiple of 16


def reference_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The reference's window loop, written out."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y1 = min(row * stride + crop, height)
            x1 = min(col * stride + crop, width)
            boxes.append((max(y1 - crop, 0), max(x1 - crop, 0), y1, x1))
    return boxes


def test_window_boxes_design_example() -> None:
    assert window_boxes(464, 608, 336, 224) == [
        (0, 0, 336, 336), (0, 224, 336, 560), (0, 272, 336, 608),
        (128, 0, 464, 336), (128, 224, 464, 560), (128, 272, 464, 608)]


@pytest.mark.parametrize('height, width, crop, stride', [
    (464, 608, 336, 224), (336, 336, 336, 224), (2048, 336, 336, 112), (200, 700, 336, 224), (96, 96, 336, 224)])
def test_window_boxes_match_reference_and_cover(height: int, width: int, crop: int, stride: int) -> None:
    boxes = window_boxes(height, width, crop, stride)
    assert boxes == reference_boxes(height, width, crop, stride)
    covered = torch.zeros(height, width, dtype=torch.bool)
    for y0, x0, y1, x1 in boxes:
        assert (y1 - y0, x1 - x0) == (min(crop, height), min(crop, width))
        covered[y0:y1, x0:x1] = True
    assert bool(covered.all())


def test_window_boxes_small_side_single_window() -> None:
    assert window_boxes(96, 120, 336, 224) == [(0, 0, 96, 120)]


def naive_guided(dino: torch.Tensor, values: torch.Tensor, clip_grid, dino_grid, beta: float,
                 gamma: float) -> torch.Tensor:
    """Per crop and per head, the reference's formula; mean(S) over all crops; valid rows only."""
    batch, heads, _, head_dim = values.shape
    unit = F.normalize(dino, dim=-1)
    sims = [unit[b] @ unit[b].T for b in range(batch)]
    mean = torch.stack(sims).mean()
    out = torch.zeros(batch, dino.shape[1], heads * head_dim, dtype=values.dtype)
    for b in range(batch):
        logits = (sims[b] - mean * beta) * gamma
        logits[logits < 0] = float('-inf')
        weights = torch.softmax(logits, dim=-1)
        for h in range(heads):
            v = values[b, h].T.reshape(1, head_dim, *clip_grid)
            v = F.interpolate(v, size=dino_grid, mode='bilinear', align_corners=False)
            v = v.reshape(head_dim, -1).T
            out[b, :, h * head_dim:(h + 1) * head_dim] = weights @ v
    return out


@pytest.mark.parametrize('clip_grid, dino_grid', [((4, 5), (4, 5)), ((3, 4), (5, 6))])
def test_guided_attention_matches_naive(clip_grid, dino_grid) -> None:
    torch.manual_seed(0)
    batch, heads, head_dim = 3, 2, 4
    dino = torch.randn(batch, dino_grid[0] * dino_grid[1], 8, dtype=torch.float64)
    values = torch.randn(batch, heads, clip_grid[0] * clip_grid[1], head_dim, dtype=torch.float64)
    out = dino_guided_attention(dino, values, clip_grid, dino_grid, beta=1.2, gamma=3.0)
    assert out.shape == (batch, dino.shape[1], heads * head_dim)
    torch.testing.assert_close(out, naive_guided(dino, values, clip_grid, dino_grid, 1.2, 3.0))


def test_guided_attention_mean_is_over_all_crops() -> None:
    torch.manual_seed(1)
    dino = torch.randn(2, 9, 8, dtype=torch.float64)
    dino[1] = dino[1, :1] + 0.1 * dino[1]  # second crop: very self-similar, raises the shared mean
    values = torch.randn(2, 2, 9, 4, dtype=torch.float64)
    together = dino_guided_attention(dino, values, (3, 3), (3, 3), 1.2, 3.0)
    alone = dino_guided_attention(dino[:1], values[:1], (3, 3), (3, 3), 1.2, 3.0)
    assert not torch.allclose(together[0], alone[0])


def test_guided_attention_mean_per_crop_is_each_crop_alone() -> None:
    """ProxyCLIP's rule: mean(S) of each crop's own similarity."""
    torch.manual_seed(4)
    dino = torch.randn(3, 9, 8, dtype=torch.float64)
    dino[1] = dino[1] + 0.7 * dino[1, :1]  # more self-similar: a higher mean than the others
    values = torch.randn(3, 2, 9, 4, dtype=torch.float64)
    per_crop = dino_guided_attention(dino, values, (3, 3), (3, 3), 1.2, 3.0, mean_per_crop=True)
    for index in range(3):
        alone = naive_guided(dino[index:index + 1], values[index:index + 1], (3, 3), (3, 3), 1.2, 3.0)
        torch.testing.assert_close(per_crop[index:index + 1], alone)
    assert not torch.allclose(per_crop, dino_guided_attention(dino, values, (3, 3), (3, 3), 1.2, 3.0))


def test_guided_attention_fully_masked_rows_stay_finite() -> None:
    """Beta * mean(S) > 1: every entry is negative; each row keeps its maximum (its own patch)."""
    torch.manual_seed(2)
    dino = torch.randn(1, 6, 16, dtype=torch.float64)
    dino[0, 5] = 0  # a zero feature: its row is constant, so it averages over all patches
    values = torch.randn(1, 2, 6, 3, dtype=torch.float64)
    out = dino_guided_attention(dino, values, (2, 3), (2, 3), beta=50.0, gamma=3.0)
    assert torch.isfinite(out).all()
    per_token = values[0].transpose(0, 1).reshape(6, -1)  # (tokens, heads * hd)
    torch.testing.assert_close(out[0, :5], per_token[:5])
    torch.testing.assert_close(out[0, 5], per_token.mean(dim=0))


def test_guided_attention_fp16_close_to_fp32() -> None:
    torch.manual_seed(3)
    dino = torch.randn(2, 16, 8)
    values = torch.randn(2, 2, 16, 4)
    full = dino_guided_attention(dino, values, (4, 4), (4, 4), 1.2, 3.0)
    half = dino_guided_attention(dino.half(), values.half(), (4, 4), (4, 4), 1.2, 3.0)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=2e-2)
