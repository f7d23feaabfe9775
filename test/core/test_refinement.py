"""SAM refinement against a per-region loop of the reference's steps and a numpy restatement of its merge."""
from __future__ import annotations

from collections import deque
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from trident_ros.config import ConfigError, TridentConfig
from trident_ros.labelling import label_map
from trident_ros.stages import sam_refinement
from trident_ros.stages.sam_refinement import RefinementParams, find_regions, mask_prompts, refine_with_sam

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
    """(K, 90, 124) probabilities of a constructed scene.

    Background 0; class 1 two large blocks and one tiny one; class 2 a block; class 3 a block where
    it wins with probability 0.17 only (below the coarse threshold 0.2).
    """
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


def reference_merge(coarse: np.ndarray, probs: np.ndarray, masks: np.ndarray, sigmoid: np.ndarray,
                    mask_class: np.ndarray, failed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's map_refinement_coarse, the merge after it and map_failed_regions, in numpy.

    Args:
        coarse: (H, W) coarse label (class 0 where below prob_thd).
        probs: (K, H, W) coarse class probabilities.
        masks: (Rk, H, W) bool, the kept masks (logits > 0).
        sigmoid: (Rk, H, W) sigmoid of their logits.
        mask_class: (Rk,) class of each kept mask.
        failed: (F, H, W) bool, regions whose mask was rejected (full size).

    Returns:
        The labels (H, W) and the scores (K, H, W) the reference returns.
    """
    classes = probs.shape[0]
    if len(mask_class) == 0:  # sam_refinement returns early: the coarse label and probabilities
        return coarse, probs
    refined = np.zeros_like(probs)
    for cls in range(classes):
        own = mask_class == cls
        if own.any():
            refined[cls] = (sigmoid[own] * probs[cls]).max(axis=0) * masks[own].any(axis=0)
    labels = refined.argmax(axis=0)
    labels = np.where(refined.sum(axis=0) == 0, coarse, labels)
    if len(failed):
        failed_logit = failed.any(axis=0) * probs
        refined = np.where(failed_logit > refined, failed_logit, refined)
        labels = np.where(failed_logit.max(axis=0) > refined.max(axis=0), coarse, labels)  # never true
    return labels, refined


def coarse_labels(probs: torch.Tensor, prob_thd: float) -> torch.Tensor:
    """The reference's seg_pred: argmax, class 0 where the best probability is below prob_thd."""
    best, labels = probs.max(dim=0)
    return labels.masked_fill(best < prob_thd, 0)


def reference_refinement(probs: torch.Tensor, sam: Sam, embedding: torch.Tensor,
                         params: RefinementParams) -> tuple[np.ndarray, np.ndarray, list[float], dict[str, np.ndarray]]:
    """The reference's sam_refinement, one SAM call per class region, then :func:`reference_merge`.

    Returns the labels, the scores, the predicted IoU of every prompted region, and the kept masks
    and failed regions (``kept_union``, ``failed``: (H, W) bool, ``kept_class``: (H, W) int, -1 where
    no kept mask, the class of the last kept mask covering the pixel).
    """
    classes, height, width = probs.shape
    down_h, down_w = height // 2, width // 2
    coarse = coarse_labels(probs, params.prob_thd)
    labels = F.interpolate(coarse[None, None].float(), size=(down_h, down_w), mode='nearest')[0, 0].long()
    probs_down = F.interpolate(probs[None], size=(down_h, down_w), mode='bilinear', align_corners=False)[0]
    labels[probs_down.max(0).values < params.coarse_thresh] = classes
    transform = ResizeLongestSide(IMAGE)
    size = sam.prompt_encoder.mask_input_size[0]
    new_h, new_w = transform.get_preprocess_shape(height, width, size)
    kept, ious, failed = [], [], []
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
                failed.append(F.interpolate(region[None, None].float(), size=(height, width), mode='nearest')[0, 0] > 0)

    mask_class = np.array([cls for cls, _ in kept], dtype=np.int64)
    logits = torch.zeros(0, height, width)
    if kept:
        logits = sam.postprocess_masks(torch.cat([low for _, low in kept]), input_size(), ORIGINAL)
        logits = F.interpolate(logits, size=(height, width), mode='bilinear', align_corners=False)[:, 0]
    failed_np = torch.stack(failed).numpy() if failed else np.zeros((0, height, width), dtype=bool)
    out_labels, scores = reference_merge(coarse.numpy(), probs.numpy(), (logits > 0).numpy(), logits.sigmoid().numpy(),
                                         mask_class, failed_np)
    kept_class = np.full((height, width), -1)
    for cls, mask in zip(mask_class, (logits > 0).numpy(), strict=True):
        kept_class[mask] = cls
    extra = {'kept_union': kept_class >= 0, 'kept_class': kept_class, 'failed': failed_np.any(axis=0)}
    return out_labels, scores, ious, extra


def ours_in_reference_ids(labels: np.ndarray) -> np.ndarray:
    """Our label image (0 unlabelled, k + 1 for class k) in the reference's ids (below prob_thd: class 0)."""
    return np.maximum(labels.astype(np.int64) - 1, 0)


def decoder_batches(sam: Sam) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """Batch size of every mask-decoder call."""
    sizes: list[int] = []
    handle = sam.mask_decoder.register_forward_hook(lambda module, args, out: sizes.append(out[0].shape[0]))
    return sizes, handle


def assert_same_as_reference(probs: torch.Tensor, sam: Sam, embedding: torch.Tensor,
                              params: RefinementParams) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Our labels equal the reference's everywhere, and the confidence is right.

    Confidence: the reference's score where a kept mask covers the pixel outside rejected regions,
    the coarse best probability where none covers it.

    Returns the reference's labels and the extra maps of :func:`reference_refinement`.
    """
    out = refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL, params)
    expected, scores, _, extra = reference_refinement(probs, sam, embedding, params)
    labels, confidence = label_map(out.scores, params.prob_thd, exempt=out.refined)
    assert np.array_equal(ours_in_reference_ids(labels), expected)
    refined = out.refined.numpy()
    assert np.array_equal(refined, extra['kept_union'])
    best = probs.max(dim=0).values.numpy()
    assert np.array_equal(labels == 0, ~refined & (best < params.prob_thd))  # unlabelled: the reference's class 0
    np.testing.assert_allclose(confidence[~refined], best[~refined], rtol=0, atol=0)
    clean = refined & ~extra['failed']
    np.testing.assert_allclose(confidence[clean], scores.max(axis=0)[clean], rtol=1e-6, atol=1e-7)
    return expected, extra


@pytest.mark.parametrize('batch, calls', [(4, [4]), (3, [3, 1]), (1, [1, 1, 1, 1])])
def test_some_kept_equals_reference(sam: Sam, embedding: torch.Tensor, monkeypatch: pytest.MonkeyPatch,
                                    batch: int, calls: list[int]) -> None:
    """Two masks kept, two rejected; kept masks of one class cover rejected regions of another."""
    monkeypatch.setattr(sam_refinement, 'DECODE_BATCH_CPU', batch)
    probs = scene()
    with torch.inference_mode():
        _, _, ious, _ = reference_refinement(probs, sam, embedding, RefinementParams(0.2, 20, 0.005, float('-inf')))
        assert len(ious) == 4  # background, two blocks of class 1, class 2; not the tiny block nor class 3
        ordered = sorted(ious)
        assert ordered[2] - ordered[1] > 1e-3
        params = RefinementParams(0.2, 20, 0.005, (ordered[1] + ordered[2]) / 2, prob_thd=0.2)
        sizes, handle = decoder_batches(sam)
        try:
            expected, extra = assert_same_as_reference(probs, sam, embedding, params)
        finally:
            handle.remove()
    assert sizes == calls + [1] * 4  # ours: batches of at most DECODE_BATCH_CPU regions; then the reference's loop
    covered_rejected = extra['kept_union'] & extra['failed']
    assert covered_rejected.sum() > 100
    # there the coarse label often differs from the refined one, which stands (the old rule,
    # "the coarse probability wins where it is higher", would have changed those pixels)
    coarse = coarse_labels(probs, params.prob_thd).numpy()
    assert (expected[covered_rejected] != coarse[covered_rejected]).sum() > 10


def test_all_masks_kept_equals_reference(sam: Sam, embedding: torch.Tensor) -> None:
    with torch.inference_mode():
        _, extra = assert_same_as_reference(scene(), sam, embedding, RefinementParams(0.2, 20, 0.005, -1e9, 0.2))
    assert not extra['failed'].any() and extra['kept_union'].mean() > 0.1


def test_nothing_kept_gives_coarse(sam: Sam, embedding: torch.Tensor) -> None:
    probs = scene()
    params = RefinementParams(0.2, 20, 0.005, 1e9, 0.2)
    with torch.inference_mode():
        expected, _ = assert_same_as_reference(probs, sam, embedding, params)
    out = refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL, params)
    assert torch.equal(out.scores, probs) and not out.refined.any()
    assert np.array_equal(expected, coarse_labels(probs, 0.2).numpy())


def test_low_probability_pixels_are_class_0_in_the_regions(sam: Sam, embedding: torch.Tensor) -> None:
    """Weak pixels are class 0 when the regions are cut.

    The reference refines its thresholded prediction: with a higher prob_thd, class 0 gets other regions.
    """
    probs = scene()
    boxes = []
    handle = sam.prompt_encoder.register_forward_hook(lambda module, args, out: boxes.append(out[0].shape[0]))
    try:
        for prob_thd in (0.0, 0.9):
            with torch.inference_mode():
                assert_same_as_reference(probs, sam, embedding, RefinementParams(0.2, 20, 0.005, -1e9, prob_thd))
    finally:
        handle.remove()
    assert boxes[0] != boxes[2]  # prompt-encoder calls: ours first, then the reference's per-region ones


def test_combine_masks_on_constructed_masks() -> None:
    """Two classes, kept masks overlapping each other and a rejected region of the other class."""
    height, width = 20, 30
    probs = torch.zeros(3, height, width)
    probs[0] = 0.5
    probs[1, :, :15] = 0.45
    probs[2, :, 15:] = 0.48
    probs[0, :, 10:20] = 0.3  # the middle strip: class 1/2 strongest, so rejected regions of class 0 lie here
    probs[1, :, 10:20], probs[2, :, 10:20] = 0.36, 0.34
    logits = torch.full((3, height, width), -6.0)
    logits[0, 2:18, 2:22] = torch.linspace(0.5, 4.0, 20)  # class 1, over class 2's side and the middle
    logits[1, 5:15, 8:28] = 3.0  # class 2, overlapping the first mask
    logits[2, 0:10, 0:30] = 1.0  # class 1 again
    mask_class = torch.tensor([1, 2, 1])
    failed = np.zeros((1, height, width), dtype=bool)
    failed[0, :, 10:20] = True  # a rejected class-0 region in the middle
    coarse = coarse_labels(probs, 0.2).numpy()
    scores, refined = sam_refinement.combine_masks(probs, logits, mask_class)
    labels, _ = label_map(scores, 0.2, exempt=refined)
    expected, _ = reference_merge(coarse, probs.numpy(), (logits > 0).numpy(), logits.sigmoid().numpy(),
                                  mask_class.numpy(), failed)
    assert np.array_equal(ours_in_reference_ids(labels), expected)
    # class 0 wins nowhere a kept mask covers, not even in its own rejected region where its coarse
    # probability is higher than every refined score
    assert not (expected[refined.numpy()] == 0).any()
    assert ((probs.max(dim=0).values > scores.max(dim=0).values).numpy() & failed[0] & refined.numpy()).any()
    assert set(np.unique(expected[refined.numpy()])) == {1, 2}


def test_weak_class_and_small_regions_do_not_prompt(sam: Sam, embedding: torch.Tensor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sam_refinement, 'DECODE_BATCH_CPU', 100)  # one decoder call per refinement: size = regions
    probs = scene()
    sizes, handle = decoder_batches(sam)
    try:
        for coarse_thresh, minimal_area in ((0.2, 20), (0.0, 20), (0.0, 9)):
            refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL,
                            RefinementParams(coarse_thresh, minimal_area, 0.005, 0.5))
        out = refine_with_sam(probs, sam, embedding, input_size(), ORIGINAL,
                              RefinementParams(0.2, 10 ** 6, 0.005, 0.5)).scores
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


def test_params_from_config() -> None:
    config = TridentConfig.from_mapping({'refinement': {'coarse_thresh': 0.1, 'minimal_area': 9, 'sam_mask_coff': 0.01,
                                                        'sam_iou_thresh': -2.5}, 'labelling.prob_thd': 0.3})
    assert RefinementParams.from_config(config) == RefinementParams(0.1, 9, 0.01, -2.5, 0.3)
    assert RefinementParams.from_config(TridentConfig()) == RefinementParams(prob_thd=0.2)


@pytest.mark.parametrize('value', [-2.5, 0.0, 1.5, 100.0])
def test_any_finite_iou_threshold_is_accepted(value: float) -> None:
    assert TridentConfig.from_mapping({'refinement.sam_iou_thresh': value}).refinement.sam_iou_thresh == value


@pytest.mark.parametrize('value', [float('nan'), float('inf'), float('-inf')])
def test_non_finite_iou_threshold_is_refused_with_what_it_does(value: float) -> None:
    with pytest.raises(ConfigError, match=r'sam_iou_thresh=.*finite.*predicted IoU exceeds it are kept'):
        TridentConfig.from_mapping({'refinement.sam_iou_thresh': value})
