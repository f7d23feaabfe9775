"""CorrCLIP (method ``corrclip``) stage by stage against plain restatements of its authors' formulas, on tiny
random-weight models: the id map, the DINO features, merging, the scoped attention, the mask class tokens' mask,
the three CLIP branches, the map correction; then the pipeline and ``trident-segment`` end to end.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from clip_helpers import deep_tiny_clip
from segment_anything import SamAutomaticMaskGenerator

from trident_ros.config import ConfigError, TridentConfig
from trident_ros.methods.corrclip import (
    combine_branches,
    corrclip_branches,
    map_correction,
    merge_regions,
    region_token_mask,
    scope_attention,
    spatial_block_indices,
)
from trident_ros.models import DinoPatches, SamEncoder, tiny_sam
from trident_ros.pipeline import TridentPipeline
from trident_ros.stages import mask_generation
from trident_ros.stages.mask_generation import (
    MaskSettings,
    paint_id_map,
    register_mask_generator,
    sam_automatic_masks,
)
from trident_ros.tools.measure import synthetic_image

LOOSE = {'corrclip.pred_iou_thresh': 0.0, 'corrclip.stability_score_thresh': 0.0, 'corrclip.points_per_side': 4}
"""Thresholds a random SAM passes, so the tiny runs have masks."""


def corrclip(changes: dict | None = None) -> TridentConfig:
    """The tiny configuration of ``corrclip`` with its preset, windows scaled to the tiny image."""
    models = {'model_scale': 'tiny', 'random_weights': True, 'device': 'cpu'}
    return TridentConfig.from_mapping({'method': 'corrclip', 'models': models}).replace(
        {'windows.input_short_side': 96, 'windows.slide_crop': 64, 'windows.slide_stride': 32, **(changes or {})})


@pytest.fixture(scope='module')
def image() -> np.ndarray:
    return synthetic_image(160, 120, seed=3)


# --- masks ------------------------------------------------------------------------------------------------------

def test_id_map_paints_by_ascending_area_so_larger_masks_cover_nested_ones():
    size = (6, 8)
    big = np.zeros(size, bool)
    big[1:5, 1:6] = True  # 20 px
    nested = np.zeros(size, bool)
    nested[2:4, 4:8] = True  # 8 px, sticks out of big at columns 6-7
    tiny = np.zeros(size, bool)
    tiny[0, 0] = True
    ids = paint_id_map([big, nested, tiny], size)
    expected = np.zeros(size, np.int32)  # the authors' loop: sorted by area, ids 1.. in that order
    for index, mask in enumerate(sorted([big, nested, tiny], key=lambda m: m.sum()), start=1):
        expected[mask] = index
    assert np.array_equal(ids, expected)
    assert ids[0, 0] == 1 and set(np.unique(ids[2:4, 6:8])) == {2} and set(np.unique(ids[big])) == {3}
    assert not (ids[2:4, 4:6] == 2).any()  # the nested part inside the big mask is gone
    assert np.array_equal(paint_id_map([], size), np.zeros(size, np.int32))


def test_sam_generator_on_our_embedding_equals_segment_anything_s_own(image):
    """One SAM encoder pass (ours) fed to segment-anything's automatic generator gives its own masks."""
    torch.manual_seed(0)
    sam = SamEncoder(tiny_sam().eval().requires_grad_(False))
    frame = np.ascontiguousarray(image[:96, :128])  # sides multiples of 16: the same encoder input
    settings = MaskSettings(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    encoder_calls = []
    hook = sam.model.image_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    stages = []

    def stage(name):
        stages.append(name)
        return torch.inference_mode()

    ours = sam_automatic_masks(frame, sam, settings, stage)
    assert len(encoder_calls) == 1 and stages == ['sam_encoder', 'mask_generator']
    hook.remove()
    upstream = SamAutomaticMaskGenerator(sam.model, points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0,
                                         stability_score_thresh=0.0, box_nms_thresh=0.7)
    records = upstream.generate(frame)
    assert records  # the comparison has masks
    assert np.array_equal(ours, paint_id_map([r['segmentation'] for r in records], frame.shape[:2]))


# --- DINO, merging, scope -----------------------------------------------------------------------------------------

def test_dino_features_are_query_plus_key_of_the_last_block():
    import timm

    torch.manual_seed(0)
    model = timm.create_model('vit_base_patch8_224.dino', pretrained=False, embed_dim=48, depth=3, num_heads=2,
                              patch_size=16, img_size=64).eval()
    crops = torch.randn(2, 3, 64, 64)
    captured = []
    hook = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, args, out: captured.append(out))
    with torch.inference_mode():
        model.forward_features(crops)  # the authors hook the qkv output of the full forward
    hook.remove()
    qkv = captured[0].reshape(2, 17, 3, -1)
    expected = (qkv[:, :, 0] + qkv[:, :, 1])[:, 1:]
    torch.testing.assert_close(DinoPatches(model).last_query_plus_key(crops), expected, rtol=1e-5, atol=1e-5)


def dbscan_min1(distance: np.ndarray, eps: float) -> np.ndarray:
    """scikit-learn's DBSCAN(metric='precomputed', min_samples=1) restated: every point is core, clusters grow
    from the lowest unvisited index over ``distance <= eps``.
    """
    labels = -np.ones(len(distance), int)
    cluster = 0
    for start in range(len(distance)):
        if labels[start] >= 0:
            continue
        labels[start], stack = cluster, [start]
        while stack:
            point = stack.pop()
            for other in np.flatnonzero(distance[point] <= eps):
                if labels[other] < 0:
                    labels[other] = cluster
                    stack.append(other)
        cluster += 1
    return labels


def authors_merge(unit: torch.Tensor, ids: torch.Tensor, eps: float) -> torch.Tensor:
    """The authors' mask merging of one window, restated (region loop, DBSCAN, ids 10000 + cluster)."""
    ids = ids.clone()
    values = torch.unique(ids)
    if len(values) <= 2:
        return ids
    regions = [ids == value for value in values]
    feats = F.normalize(torch.stack([unit[mask].mean(dim=0) for mask in regions]), dim=1)[1:]
    sim = feats @ feats.T
    cluster = dbscan_min1((sim.max() - sim).numpy(), eps)
    for index, value in enumerate(cluster, start=1):
        ids[regions[index]] = int(value) + 10000
    return ids


def test_merging_matches_the_authors_dbscan_and_keeps_u0():
    torch.manual_seed(1)
    base = F.normalize(torch.randn(3, 16), dim=-1)
    ids = torch.tensor([0] * 6 + [3] * 6 + [5] * 6 + [9] * 6 + [12] * 6)
    # regions 3 and 9 share a direction (merged), 5 and 12 differ from everything
    direction = {0: base[0], 3: base[1], 9: base[1], 5: base[2], 12: -base[1]}
    unit = F.normalize(torch.stack([direction[int(i)] for i in ids]) + 0.01 * torch.randn(30, 16), dim=-1)
    merged = merge_regions(unit, ids, 0.2)
    assert torch.equal(merged, authors_merge(unit, ids, 0.2))
    assert (merged[:6] == 0).all() and merged[6] == merged[18] and len(torch.unique(merged)) == 4
    single = torch.full((30,), 7)  # a single region, and two: unchanged
    assert torch.equal(merge_regions(unit, single, 0.2), single)
    assert torch.equal(merge_regions(unit, ids.clamp(max=3), 0.2), ids.clamp(max=3))
    covered = ids + 1  # no unsegmented pixel: the smallest id (1) plays u0 and is not merged
    assert torch.equal(merge_regions(unit, covered, 0.2), authors_merge(unit, covered, 0.2))


def authors_scope(similarity: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    """The authors' scope reconstruction of one window, restated (region loop, u0 = first unique id)."""
    regions = [(value == ids) for value in torch.unique(ids)]
    allowed = torch.zeros_like(similarity).bool()
    for mask in regions[1:]:
        allowed |= torch.outer(mask, mask)
    u0 = regions[0]
    allowed |= (u0[None, :] | u0[:, None]) & (similarity > similarity.mean())
    return (similarity.masked_fill(~allowed, float('-inf')) * tau).softmax(dim=-1)


@pytest.mark.parametrize('offset', [0, 4], ids=['with_unsegmented', 'fully_covered'])
def test_scope_attention_matches_the_authors_with_u0_the_smallest_id(offset):
    torch.manual_seed(2)
    unit = F.normalize(torch.randn(20, 8), dim=-1)
    similarity = unit @ unit.T
    ids = torch.tensor([0, 0, 0, 0, 2, 2, 2, 5, 5, 5, 5, 5, 7, 7, 0, 2, 5, 7, 7, 0]) + offset
    weights = scope_attention(similarity, ids, 4.0)
    torch.testing.assert_close(weights, authors_scope(similarity, ids, 4.0))
    u0 = ids == ids.min()  # with offset 4 no pixel is unsegmented: region 4 plays u0
    other = (ids[:, None] != ids[None, :]) & ~u0[:, None] & ~u0[None, :]
    assert (weights[other] == 0).all()  # different regions never interact
    assert (weights[u0][:, u0][(similarity[u0][:, u0] <= similarity.mean())] == 0).all()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(20))


def test_scope_attention_keeps_a_row_whose_every_pair_is_below_the_mean():
    similarity = torch.ones(4, 4)  # constant features: nothing is above the mean; the authors' rows are NaN
    weights = scope_attention(similarity, torch.tensor([0, 0, 1, 1]), 4.0)
    assert torch.isfinite(weights).all()
    assert torch.equal(weights[:2], torch.eye(4)[:2]) and torch.allclose(weights[2:, 2:], torch.full((2, 2), 0.5))


# --- the mask class tokens and the CLIP branches ------------------------------------------------------------------

def test_region_token_mask_is_additive_because_open_clip_casts_a_bool_mask():
    regions = torch.tensor([[[True, False, True, False], [False, True, False, True]]])
    mask = region_token_mask(regions, torch.float32)[0]
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) == {0.0, float('-inf')}
    allowed = mask == 0
    assert allowed[2:, 2:].all() and not allowed[2:, :2].any()  # originals see only originals
    assert torch.equal(allowed[0], torch.tensor([False, False, True, True, False, True, False]))
    assert torch.equal(allowed[1], torch.tensor([False, False, True, False, True, False, True]))
    clip = deep_tiny_clip()
    block = clip.visual.transformer.resblocks[0]
    x = torch.randn(1, 7, clip.width)
    with torch.inference_mode():
        as_bool = block(x, attn_mask=~allowed)  # True = masked, as the authors' open_clip reads it
        unmasked = block(x)
        additive = block(x, attn_mask=mask)
    assert not torch.allclose(additive, unmasked)
    # open_clip casts the bool mask to 0/1 floats: a near-uniform shift, far from the additive mask's result
    assert (as_bool - unmasked).abs().max() < (additive - unmasked).abs().max()


def authors_branches(clip, crop: torch.Tensor, ids: torch.Tensor, dino_grid, attention: torch.Tensor):
    """The authors' VisionTransformer.forward after the scope (one window, sequence first), restated."""
    x, token_size = clip.embed(crop)
    x = x.permute(1, 0, 2)  # NLD -> LND
    masks = F.interpolate(ids.reshape(1, 1, *dino_grid).float(), size=token_size, mode='nearest').int()[0, 0]
    region_masks = [value == masks for value in torch.unique(masks)]
    mct = x[:1].repeat(len(region_masks), 1, 1)
    num_mct = len(region_masks)
    x = torch.cat([mct, x], dim=0)
    attn_mask = torch.zeros((x.shape[0], x.shape[0])).bool()
    attn_mask[num_mct:, num_mct:] = True
    attn_mask[:num_mct, num_mct] = True
    stacked = torch.stack(region_masks)
    attn_mask[:num_mct, num_mct + 1:] = stacked.view(num_mct, -1)
    attn_mask = torch.zeros(attn_mask.shape).masked_fill(~attn_mask, float('-inf'))  # the mask their open_clip meant
    blocks = clip.visual.transformer.resblocks
    layers = len(blocks)
    spatial = []
    with torch.inference_mode():
        for idx, blk in enumerate(blocks[:-1]):
            x = blk(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
            if layers - 2 - 5 <= idx <= layers - 3:
                spatial.append(x[num_mct:])
        blk = blocks[-1]
        both = torch.cat([x[num_mct:], torch.stack(spatial).mean(0)], dim=1)
        dim = blk.attn.embed_dim
        v = F.linear(blk.ln_1(both), blk.attn.in_proj_weight[2 * dim:], blk.attn.in_proj_bias[2 * dim:])
        v = v.permute(1, 2, 0)[:, :, 1:].unflatten(2, token_size)
        v = F.interpolate(v, size=dino_grid, mode='bilinear', align_corners=False).flatten(2, 3).transpose(1, 2)
        both = blk.attn.out_proj(torch.bmm(attention.expand(2, -1, -1), v))
        mct = blk(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)[:num_mct, 0]
        expand = F.interpolate(stacked.unsqueeze(1).float(), size=dino_grid, mode='nearest').flatten(1)
        semantic = expand.T @ mct
    return both[0], both[1], semantic


def test_branches_match_the_authors_forward_with_a_region_lost_by_downsampling():
    """12 blocks (spatial branch: blocks 6-10), a DINO grid twice CLIP's: region 3 lies on odd DINO rows only, so
    CLIP's nearest grid loses it; its patches take the mask class token of their CLIP cell's region.
    """
    clip = deep_tiny_clip()
    torch.manual_seed(3)
    crops = torch.randn(2, 3, 64, 64)  # CLIP grid 4x4, DINO grid 8x8
    dino_grid = (8, 8)
    ids = torch.zeros(2, 8, 8, dtype=torch.long)
    ids[0, :, 4:] = 10001
    ids[0, 1, :4] = 3  # odd row: not sampled by the nearest 2x downsample
    ids[1, 4:, :] = 10000  # the second window: two regions
    ids = ids.reshape(2, -1)
    attention = torch.rand(2, 64, 64).softmax(dim=-1)
    ours = corrclip_branches(clip, crops, ids, dino_grid, attention)
    assert list(spatial_block_indices(12, 0)) == [5, 6, 7, 8, 9]
    for window in range(2):
        main, spatial, semantic = authors_branches(clip, crops[window:window + 1], ids[window], dino_grid,
                                                   attention[window])
        torch.testing.assert_close(ours.main[window], main, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.spatial[window], spatial, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.semantic[window], semantic, rtol=1e-4, atol=1e-5)
    lost = ids[0] == 3
    assert torch.equal(ours.semantic[0][lost], ours.semantic[0][ids[0] == 0][:1].expand(int(lost.sum()), -1))
    combined = combine_branches(clip, ours, 1.0, 0.5)
    visual = clip.visual
    expected = F.normalize((visual.ln_post(ours.main) + visual.ln_post(ours.spatial)
                            + 0.5 * visual.ln_post(ours.semantic)) @ visual.proj, dim=-1)
    torch.testing.assert_close(combined, expected)


# --- labels -----------------------------------------------------------------------------------------------------

def test_map_correction_votes_per_mask_except_the_smallest_id():
    torch.manual_seed(4)
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 2, 2, 1, 1], [3, 3, 2, 2, 2]])
    labels = torch.tensor([[1, 2, 2, 3, 2], [0, 1, 1, 2, 2], [0, 3, 1, 0, 0]])
    corrected = map_correction(labels, ids, 4)
    expected = labels.clone()  # the authors' loop, skipping the first unique id
    for value in torch.unique(ids)[1:]:
        mask = ids == value
        expected[mask] = Counter(labels[mask].tolist()).most_common(1)[0][0]
    assert torch.equal(corrected, expected)
    assert torch.equal(corrected[ids == 0], labels[ids == 0]) and (corrected[ids == 2] == 1).all()
    covered = ids + 5  # no unsegmented pixel: region 5 (the smallest id) keeps its labels
    assert torch.equal(map_correction(labels, covered, 4)[covered == 5], labels[covered == 5])


# --- the method through the pipeline and the CLI ------------------------------------------------------------------

def test_relabel_runs_no_encoder_and_no_mask_generator(image):
    pipeline = TridentPipeline(corrclip(LOOSE))
    models = pipeline.models
    modules = [models.clip.visual.conv1, models.dino.model.patch_embed.proj, models.sam.model.image_encoder,
               models.sam.model.mask_decoder]
    calls = [0] * len(modules)
    for index, module in enumerate(modules):
        module.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    features = pipeline.encode_image(image)
    assert calls[:3] == [1, 1, 1] and calls[3] >= 1  # one pass of each encoder, the decoder per prompt batch
    ids = features.method.ids
    assert ids.shape == image.shape[:2] and int(ids.max()) > 0
    first = pipeline.label(features, pipeline.encode_vocabulary('door, sofa, table'))
    before = list(calls)
    second = pipeline.label(features, pipeline.encode_vocabulary('table, door, window'))
    assert calls == before and 'map_correction' in second.timings
    for seg in (first, second):  # every mask but the smallest id is one label
        for value in torch.unique(ids)[1:]:
            assert len(np.unique(seg.labels[(ids == value).numpy()])) == 1
    assert set(np.unique(first.labels)) <= {1, 2, 3}


def test_a_generator_s_map_of_the_wrong_size_is_a_clear_error(image, monkeypatch):
    monkeypatch.setattr(mask_generation, '_GENERATORS', dict(mask_generation._GENERATORS))  # restored afterwards
    register_mask_generator('test_wrong_size', lambda img, sam, settings, stage: np.zeros((3, 3), np.int32))
    pipeline = TridentPipeline(corrclip({'corrclip.mask_generator': 'test_wrong_size'}))
    with pytest.raises(ValueError, match="'test_wrong_size' returned a \\(3, 3\\) int32 map"):
        pipeline.encode_image(image)


def test_generator_and_params_are_checked():
    with pytest.raises(ConfigError, match='mask_generator'):
        corrclip({'corrclip.mask_generator': 'nope'}).validate()
    with pytest.raises(ConfigError, match='tau'):
        corrclip({'corrclip.tau': 0.0}).validate()
    config = corrclip()
    assert config.models.dino_model == 'vit_base_patch8_224.dino' and config.labelling.prob_thd == 0.0
    assert config.windows.slide_stride == 32 and config.labelling.logit_scale == 40.0


def test_cli_segments_with_corrclip(tmp_path):
    cv2.imwrite(str(tmp_path / 'scene.png'), cv2.cvtColor(synthetic_image(96, 64), cv2.COLOR_RGB2BGR))
    out = tmp_path / 'out'
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.segment', str(tmp_path / 'scene.png'),
                             '-v', 'door, chair', '-o', str(out), '--method', 'corrclip', '--random-weights', '--tiny',
                             '--device', 'cpu'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    labels = cv2.imread(str(out / 'scene_labels.png'), cv2.IMREAD_UNCHANGED)
    summary = json.loads((out / 'scene_masks.json').read_text())
    assert labels.shape == (64, 96) and summary['vocabulary'] == ['door', 'chair']
    assert set(np.unique(labels)) <= {1, 2}  # the preset's prob_thd 0
