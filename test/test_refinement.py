"""Batched SAM refinement against a per-region loop of the reference's steps, on a tiny random SAM."""
from __future__ import annotations

from collections import deque
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from trident_ros import refinement
from trident_ros.refinement import RefinementParams, find_regions, mask_prompts, refine_with_sam

IMAGE = 128  # tiny SAM input side: 8 x 8 embedding, 32 x 32 mask prompts
ORIGINAL = (96, 128)  # what SAM encoded (sides rounded up to multiples of 16)
HEIGHT, WIDTH = 90, 124  # the image, and the probabilities


@pytest.fixture(scope='module')
def sam() -> Sam:
    torch.manual_seed(0)
    dim = 32
    encoder = ImageEncoderViT(img_size=IMAGE, patch_size=16, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                              out_chans=dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, global_attn_indexes=(0,), window_size=4)
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(IMAGE // 16, IMAGE // 16),
                           input_image_size=(IMAGE, IMAGE), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=32,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2))
    return Sam(encoder, prompt, decoder, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


@pytest.fixture(scope='module')
def embedding(sam: Sam) -> torch.Tensor:
    image = torch.rand(1, 3, *ORIGINAL) * 255
    with torch.inference_mode():
        return sam.image_encoder(sam.preprocess(image))


def input_size() -> tuple[int, int]:
    return ResizeLongestSide.get_preprocess_shape(*ORIGINAL, IMAGE)


def scene(classes: int = 6) -> torch.Tensor:
    """(K, 90, 124) probabilities: background 0; class 1 two large blocks and one tiny one; class 2 a block;
    class 3 a block where it wins with probability 0.17 only (below the coarse threshold 0.2)."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.zeros(HEIGHT, WIDTH, dtype=torch.long)
    labels[10:40, 10:50] = 1
    labels[70:88, 90:120] = 1
    labels[60:66, 100:106] = 1  # 3 x 3 pixels at half resolution
    labels[50:85, 20:70] = 2
    logits = 4.0 * F.one_hot(labels, classes).permute(2, 0, 1).float()
    logits += 0.5 * torch.randn(classes, HEIGHT, WIDTH, generator=generator)
    logits[:, 5:30, 80:120] = 0.0
    logits[3, 5:30, 80:120] = 0.05
    return logits.softmax(dim=0)


def flood_regions(mask: torch.Tensor) -> list[torch.Tensor]:
    """8-connected regions of a boolean map, by breadth-first search."""
    height, width = mask.shape
    seen = torch.zeros_like(mask)
    regions = []
    for y in range(height):
        for x in range(width):
            if not mask[y, x] or seen[y, x]:
                continue
            region = torch.zeros_like(mask)
            queue = deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                region[cy, cx] = True
                for ny in range(max(cy - 1, 0), min(cy + 2, height)):
                    for nx in range(max(cx - 1, 0), min(cx + 2, width)):
                        if mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            queue.append((ny, nx))
            regions.append(region)
    return regions


def reference_refinement(probs: torch.Tensor, sam: Sam, embedding: torch.Tensor,
                         params: RefinementParams) -> tuple[torch.Tensor, list[float]]:
    """The reference's sam_refinement, one region per SAM call, plus the design page's merge rules.

    Returns the scores and the predicted IoU of every prompted region.
    """
    classes, height, width = probs.shape
    down_h, down_w = height // 2, width // 2
    labels = F.interpolate(probs.argmax(0)[None, None].float(), size=(down_h, down_w), mode='nearest')[0, 0].long()
    probs_down = F.interpolate(probs[None], size=(down_h, down_w), mode='bilinear', align_corners=False)[0]
    labels[probs_down.max(0).values < params.coarse_thresh] = classes
    transform = ResizeLongestSide(IMAGE)
    size = sam.prompt_encoder.mask_input_size[0]
    new_h, new_w = transform.get_preprocess_shape(height, width, size)
    kept, ious = [], []
    failed = torch.zeros(down_h, down_w, dtype=torch.bool)
    for cls in range(classes):
        if probs_down[cls].max() < params.coarse_thresh:
            continue
        prompt = F.interpolate(probs_down[cls][None, None], size=(new_h, new_w), mode='bilinear',
                               align_corners=False).squeeze(0)
        prompt = F.pad(prompt, (0, size - new_w, 0, size - new_h))
        prompt = torch.where(prompt > params.coarse_thresh, params.sam_mask_coff * prompt, 0.0)  # (1, S, S)
        for region in flood_regions(labels == cls):
            if region.sum() < params.minimal_area:
                continue
            best = torch.argmax(probs_down[cls] * region)
            point = torch.tensor([[[best % down_w, best // down_w]]])
            ys, xs = torch.nonzero(region, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max(), ys.max()]])
            sparse, dense = sam.prompt_encoder(
                points=(transform.apply_coords_torch(point, (down_h, down_w)), torch.ones(1, 1)),
                boxes=transform.apply_boxes_torch(box, (down_h, down_w)), masks=prompt)
            low_res, iou = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
            ious.append(float(iou))
            if float(iou) > params.sam_iou_thresh:
                kept.append((cls, low_res))
            else:
                failed |= region

    refined = torch.zeros_like(probs)
    for cls in range(classes):
        lows = [low for owner, low in kept if owner == cls]
        if not lows:
            continue
        logits = sam.postprocess_masks(torch.cat(lows), input_size(), ORIGINAL)
        logits = F.interpolate(logits, size=(height, width), mode='bilinear', align_corners=False)[:, 0]
        union = (logits > 0).any(dim=0)
        refined[cls] = (logits.sigmoid() * probs[cls]).max(dim=0).values * union
    scores = torch.where(refined.sum(0, keepdim=True) == 0, probs, refined)
    failed = F.interpolate(failed[None, None].float(), size=(height, width), mode='nearest')[0, 0].bool()
    return torch.where(failed & (probs > scores), probs, scores), ious


def decoder_batches(sam: Sam) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Batch size of every mask-decoder call."""
    sizes: list[int] = []
    handle = sam.mask_decoder.register_forward_hook(lambda module, args, out: sizes.append(out[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize('batch, calls', [(4, [4]), (3, [3, 1]), (1, [1, 1, 1, 1])])
def test_batched_equals_per_region_loop(sam: Sam, embedding: torch.Tensor, monkeypatch: pytest.MonkeyPatch,
                                        batch: int, calls: list[int]) -> None:
    monkeypatch.setattr(refinement, 'DECODE_BATCH_CPU', batch)
    probs = scene()
    params = RefinementParams(coarse_thresh=0.2, minimal_area=20, sam_mask_coff=0.005, sam_iou_thresh=float('-inf'))
    with torch.inference_mode():
        _, ious = reference_refinement(probs, sam, embedding, params)
        assert len(ious) == 4  # background, two blocks of class 1, class 2; not the tiny block nor class 3
        ordered = sorted(ious)
        assert ordered[2] - ordered[1] > 1e-3
        params = RefinementParams(0.2, 20, 0.005, (ordered[1] + ordered[2]) / 2)  # two kept, two rejected
        expected, _ = reference_refinement(probs, sam, embedding, params)
        sizes, handle = decoder_batches(sam)
        try:
            out = refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL, params).scores
        finally:
            handle.remove()
    assert sizes == calls  # decoder calls on batches of at most DECODE_BATCH_CPU regions
    assert out.shape == probs.shape and out.dtype == probs.dtype
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, probs)


def test_all_masks_kept_equals_loop(sam: Sam, embedding: torch.Tensor) -> None:
    probs = scene()
    params = RefinementParams(0.2, 20, 0.005, float('-inf'))
    with torch.inference_mode():
        expected, _ = reference_refinement(probs, sam, embedding, params)
        out = refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL, params).scores
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_nothing_kept_gives_coarse(sam: Sam, embedding: torch.Tensor) -> None:
    probs = scene()
    out = refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL, RefinementParams(0.2, 20, 0.005, 1e9)).scores
    assert torch.equal(out, probs)


def test_weak_class_and_small_regions_do_not_prompt(sam: Sam, embedding: torch.Tensor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refinement, 'DECODE_BATCH_CPU', 100)  # one decoder call per refinement: its size counts regions
    probs = scene()
    sizes, handle = decoder_batches(sam)
    try:
        refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL, RefinementParams(0.2, 20, 0.005, 0.5)).scores
        refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL, RefinementParams(0.0, 20, 0.005, 0.5)).scores
        refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL, RefinementParams(0.0, 9, 0.005, 0.5)).scores
        out = refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL, RefinementParams(0.2, 10 ** 6, 0.005, 0.5)).scores
    finally:
        handle.remove()
    # coarse_thresh 0 adds class 3's block; minimal_area 9 adds the 3 x 3 block; a huge area prompts nothing
    assert sizes == [4, 5, 6]
    assert torch.equal(out, probs)


def test_find_regions_8_connected() -> None:
    labels = torch.full((8, 10), -1)
    labels[0:2, 0:2] = 0
    labels[2:4, 2:4] = 0  # touches the first square at a corner only
    labels[5:8, 0:2] = 1  # 6 pixels
    labels[6, 8:10] = 1  # 2 pixels: below the minimal area
    labels[0:3, 6:9] = 2  # 9 pixels
    probs = torch.zeros(3, 8, 10)
    probs[0, 3, 3] = 0.9
    probs[1, 6:8, 1] = 0.7  # a tie: the first in raster order wins
    probs[2, 0, 6] = 0.5
    regions = find_regions(labels, probs, minimal_area=3)
    assert regions.classes.tolist() == [0, 1, 2]
    assert regions.boxes.tolist() == [[0, 0, 3, 3], [0, 5, 1, 7], [6, 0, 8, 2]]
    assert regions.points.tolist() == [[3, 3], [1, 6], [6, 0]]
    expected_index = torch.full((8, 10), -1)
    expected_index[labels == 0] = 0
    expected_index[5:8, 0:2] = 1
    expected_index[0:3, 6:9] = 2
    assert torch.equal(regions.index, expected_index)


def test_mask_prompts_formula() -> None:
    probs = torch.rand(2, 10, 20, generator=torch.Generator().manual_seed(2))
    out = mask_prompts(probs, (20, 40), (16, 16), coarse_thresh=0.4, coff=0.005)
    assert out.shape == (2, 1, 16, 16)
    resized = F.interpolate(probs[:, None], size=(8, 16), mode='bilinear', align_corners=False)
    torch.testing.assert_close(out[:, :, :8], torch.where(resized > 0.4, 0.005 * resized, 0.0))
    assert not out[:, :, 8:].any()


def test_single_class_and_tiny_inputs(sam: Sam, embedding: torch.Tensor) -> None:
    ones = torch.ones(1, HEIGHT, WIDTH)
    out = refine_with_sam(ones, sam, embedding, input_size(), ORIGINAL, RefinementParams(0.2, 20, 0.005, -1e9)).scores
    assert out.shape == (1, HEIGHT, WIDTH) and torch.isfinite(out).all()
    line = torch.rand(3, 1, WIDTH)
    assert torch.equal(refine_with_sam(line, sam, embedding, input_size(), ORIGINAL, RefinementParams()).scores, line)


def test_fp16_probabilities_keep_dtype(sam: Sam, embedding: torch.Tensor) -> None:
    probs = scene()
    params = RefinementParams(0.2, 20, 0.005, float('-inf'))
    half = refine_with_sam(probs.half(), sam, embedding, input_size(), ORIGINAL, params).scores
    full = refine_with_sam(probs.half().float(), sam, embedding, input_size(), ORIGINAL, params).scores
    assert half.dtype == torch.float16
    assert torch.equal(half, full.half())
    assert not torch.equal(half, probs.half())
