"""CorrCLIP (method ``corrclip``): region-scoped DINO correlations and mask class tokens on CLIP.

Stage by stage after its authors' code (zdk258/CorrCLIP, ``CorrCLIPv1``: ``corrclip_segmentor.py`` and
``open_clip/transformer.py`` VisionTransformer.forward), on the ``windows.slide_crop`` windows:

1. Masks: one id map per frame, 0 = no mask (a registered mask generator,
   :mod:`trident_ros.stages.mask_generation`; SAM's automatic generator on the loaded SAM by default), nearest to
   the resized image, cut per window.
2. DINO: ``q + k`` of the last block's attention, L2-normalised; ``S = F F^T`` per window
   (:meth:`~trident_ros.models.DinoPatches.last_query_plus_key`).
3. Merging: the window's ids on the DINO grid; with more than two ids, every region but the smallest id ``u0``
   gets the mean of its unit DINO features; regions whose cosine is within ``merge_threshold`` of the largest
   cosine are chained into one (DBSCAN with ``min_samples`` 1 on ``max(C) - C``): :func:`merge_regions`.
4. Scope: ``A = softmax(tau S)`` only over pairs of the same region (not ``u0``), or pairs touching ``u0``
   whose ``S`` is above the window's mean: :func:`scope_attention`.
5. CLIP: one mask class token per region of the window (on CLIP's grid) sees the class token and its own region's
   patches; the original tokens see only each other (:func:`region_token_mask`). Main branch: ``A v`` of the
   last block's values of block 11's output; spatial branch: the same from the mean of blocks 6-10's outputs;
   semantic branch: the mask class tokens after the full last block, each DINO patch taking its region's;
   ``f = ln_post(main) + w_s ln_post(spatial) + w_m ln_post(semantic)``, projected, L2-normalised:
   :func:`corrclip_window`.

Steps 1-5 are image side: the unit features are spliced over the windows on the DINO grid and cached with the
original-resolution id map. At labelling: the common class probabilities and thresholded argmax, then the map
correction (:func:`map_correction`): every mask but the smallest id takes its most frequent label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch idiom)

from trident_ros.labelling import label_map
from trident_ros.methods.base import Frame, Labelling, Method, MethodFeatures, ParamError, setting
from trident_ros.models import ClipDense
from trident_ros.stages.mask_generation import MaskSettings, mask_generator, mask_generator_names
from trident_ros.stages.splice import splice_unit_features
from trident_ros.stages.windows import cut_windows, normalise

AUTHORS_SPATIAL_BLOCKS = {12: 5, 24: 12, 32: 28}
"""Blocks averaged by the spatial branch per tower depth in the authors' code (else ``depth - 4``)."""


@dataclass(frozen=True)
class CorrclipParams:
    """Section ``corrclip``."""

    mask_generator: str = setting('sam', "mask generator (registered name): 'sam', SAM's automatic mask generator "
                                         'on the loaded SAM (one encoder pass)')
    points_per_side: int = setting(8, 'mask generator: point prompts per image side')
    points_per_batch: int = setting(16, 'mask generator: prompts decoded at once (memory)')
    pred_iou_thresh: float = setting(0.7, "mask generator: keep masks whose predicted IoU exceeds this")
    stability_score_thresh: float = setting(0.7, 'mask generator: keep masks whose stability score is at least this')
    box_nms_thresh: float = setting(0.7, 'mask generator: box IoU of duplicate masks')
    tau: float = setting(4.0, 'temperature of the region-scoped DINO attention softmax(tau * S)')
    merge_threshold: float = setting(0.2, 'regions whose mean DINO features have a cosine within this of the '
                                          'largest are merged (DBSCAN eps on max(C) - C)')
    spatial_weight: float = setting(1.0, 'weight of the spatial branch (mean of the middle blocks)')
    semantic_weight: float = setting(0.5, 'weight of the semantic branch (mask class tokens)')
    spatial_blocks: int = setting(0, "blocks before the second-to-last averaged by the spatial branch; 0: the "
                                     "authors' count for the tower (5 of 12, 12 of 24, 28 of 32, else depth - 4)")

    def validate(self) -> None:
        """Raise :class:`ParamError` for the first invalid field."""
        if self.mask_generator not in mask_generator_names():
            raise ParamError('mask_generator', f'one of {", ".join(mask_generator_names())}')
        for name in ('points_per_side', 'points_per_batch'):
            if getattr(self, name) < 1:
                raise ParamError(name, 'must be >= 1')
        for name in ('pred_iou_thresh', 'stability_score_thresh', 'box_nms_thresh'):
            if not 0 <= getattr(self, name) <= 1:
                raise ParamError(name, 'must be in [0, 1]')
        if not self.tau > 0:
            raise ParamError('tau', 'must be > 0')
        if self.merge_threshold < 0:
            raise ParamError('merge_threshold', 'must be >= 0')
        for name in ('spatial_weight', 'semantic_weight'):
            if not 0 <= getattr(self, name) < math.inf:
                raise ParamError(name, 'must be finite and >= 0')
        if self.spatial_blocks < 0:
            raise ParamError('spatial_blocks', 'must be >= 0 (0: the authors\' count)')

    def mask_settings(self) -> MaskSettings:
        return MaskSettings(points_per_side=self.points_per_side, points_per_batch=self.points_per_batch,
                            pred_iou_thresh=self.pred_iou_thresh, stability_score_thresh=self.stability_score_thresh,
                            box_nms_thresh=self.box_nms_thresh)


@dataclass
class CorrclipFeatures(MethodFeatures):
    """CorrCLIP's image side: ``dense`` ``(E, Hg, Wg)`` on the DINO grid of the resized image.

    Attributes:
        ids: ``(H, W)`` int32 id map of the frame at its original size, unmerged (the map correction's regions).
    """

    ids: torch.Tensor | None = None


def nearest(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(h, w)`` integer map -> ``size`` by torch's nearest neighbour (as the authors resize their id maps;
    ids below 2**24, exact in float32): ``(H, W)`` int64.
    """
    return F.interpolate(ids[None, None].float(), size=tuple(size), mode='nearest')[0, 0].long()


def connected_components(adjacent: torch.Tensor) -> torch.Tensor:
    """Component of every node of a symmetric boolean adjacency ``(n, n)`` (diagonal set): ``(n,)`` int64, each
    component numbered by its smallest node.
    """
    label = torch.arange(adjacent.shape[0], device=adjacent.device)
    big = adjacent.shape[0]
    while True:
        spread = torch.where(adjacent, label[None, :], big).amin(dim=1)
        spread = spread[spread]  # pointer jumping
        if torch.equal(spread, label):
            return label
        label = spread


def merge_regions(unit: torch.Tensor, ids: torch.Tensor, threshold: float) -> torch.Tensor:
    """Merge the regions of one window whose mean DINO features are alike.

    With more than two ids present: ``r_j`` = L2-normalised mean of the unit features of region ``j``, for every
    id but the smallest ``u0``; ``C = r r^T``; regions are chained where ``max(C) - C_ij <= threshold`` (DBSCAN,
    precomputed distance, ``min_samples`` 1, which leaves no noise); region ``j`` then gets id
    ``10000 + its component``. ``u0`` keeps its id. With two ids or fewer nothing changes.

    Args:
        unit: ``(M, D)`` L2-normalised DINO features of the window.
        ids: ``(M,)`` int64 region id of every DINO patch.
        threshold: DBSCAN eps.

    Returns:
        ``(M,)`` int64 merged ids.
    """
    values, inverse = torch.unique(ids, return_inverse=True)
    if len(values) <= 2:
        return ids
    count = len(values)
    member = F.one_hot(inverse, count).to(unit.dtype)  # (M, R)
    regions = F.normalize(member.T @ unit / member.sum(dim=0)[:, None], dim=-1)[1:]  # (R-1, D), u0 dropped
    cosine = regions @ regions.T
    component = connected_components(cosine.max() - cosine <= threshold)
    _, component = torch.unique(component, return_inverse=True)
    merged = torch.cat([values[:1], 10000 + component])
    return merged[inverse]


def scope_attention(similarity: torch.Tensor, ids: torch.Tensor, tau: float) -> torch.Tensor:
    """CorrCLIP's region-scoped attention of one window.

    ``allowed(i, j) = [u(i) = u(j) != u0] or [(u(i) = u0 or u(j) = u0) and S_ij > mean(S)]``, ``u0`` the smallest
    id, the mean over all entries; ``A = softmax(tau S)`` over the allowed entries of each row. The diagonal is
    always allowed (the authors' NaN row of a patch of ``u0`` whose own ``S_ii`` is not above the mean, only
    possible for constant features, gets its own patch instead).

    Args:
        similarity: ``(M, M)`` cosine similarity of the DINO features.
        ids: ``(M,)`` merged region id of every patch.
        tau: temperature.

    Returns:
        ``(M, M)`` float32 row-stochastic weights.
    """
    unsegmented = ids == ids.min()
    same = (ids[:, None] == ids[None, :]) & ~unsegmented[:, None]
    touching = (unsegmented[:, None] | unsegmented[None, :]) & (similarity > similarity.mean())
    allowed = same | touching
    allowed.diagonal().fill_(True)
    return (tau * similarity.float()).masked_fill(~allowed, float('-inf')).softmax(dim=-1)


def region_token_mask(regions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask of the sequence ``[mct_1..mct_R, CLS, p_1..p_N]`` (0 allowed, -inf not).

    The original tokens (class token and patches) see only each other; mask class token ``r`` sees the class token
    and the patches of region ``r``, not itself nor another mask class token. Additive, as open_clip casts a mask to
    the query's dtype (a boolean mask would become 0/1 and mask nothing).

    Args:
        regions: ``(B, R, N)`` bool, patch ``n`` in region ``r`` of window ``b``.
        dtype: the mask's dtype (the tower's).

    Returns:
        ``(B, R + 1 + N, R + 1 + N)``.
    """
    batch, count, patches = regions.shape
    size = count + 1 + patches
    allowed = torch.zeros(batch, size, size, dtype=torch.bool, device=regions.device)
    allowed[:, count:, count:] = True
    allowed[:, :count, count] = True
    allowed[:, :count, count + 1:] = regions
    return torch.zeros(allowed.shape, dtype=dtype, device=regions.device).masked_fill_(~allowed, float('-inf'))


def spatial_block_indices(depth: int, spatial_blocks: int) -> range:
    """0-based indices of the blocks whose outputs the spatial branch averages.

    The authors' ``depth - 2 - n <= index <= depth - 3`` (n = ``spatial_blocks``, 0: :data:`AUTHORS_SPATIAL_BLOCKS`);
    a tower too shallow for it (the small test ones) averages the block before the last.
    """
    count = spatial_blocks or AUTHORS_SPATIAL_BLOCKS.get(depth, depth - 4)
    kept = range(max(0, depth - 2 - count), depth - 2)
    return kept if len(kept) else range(depth - 2, depth - 1)


@dataclass
class WindowBranches:
    """The windows' three branches before the weighted sum, on the DINO grid (for tests and comparisons).

    Attributes:
        main: ``(B, M, D)`` ``out_proj(A v)`` of block 11's output.
        spatial: ``(B, M, D)`` the same of the mean of the spatial blocks' outputs.
        semantic: ``(B, M, D)`` every patch's mask class token after the last block.
    """

    main: torch.Tensor
    spatial: torch.Tensor
    semantic: torch.Tensor


@torch.inference_mode()
def corrclip_branches(clip: ClipDense, crops: torch.Tensor, ids: torch.Tensor, dino_grid: tuple[int, int],
                      attention: torch.Tensor, spatial_blocks: int = 0) -> WindowBranches:
    """CLIP with mask class tokens on windows (each window its own regions): the three branches.

    Args:
        clip: the CLIP wrapper.
        crops: ``(B, 3, h, w)`` CLIP-normalised.
        ids: ``(B, dh * dw)`` merged region ids on the DINO grid.
        dino_grid: ``(dh, dw)``.
        attention: ``(B, M, M)`` :func:`scope_attention`, M = dh * dw.
        spatial_blocks: see :func:`spatial_block_indices`.

    Returns:
        :class:`WindowBranches`.
    """
    x, grid = clip.embed(crops)  # (B, 1 + N, D)
    blocks = clip.visual.transformer.resblocks
    batch_first = getattr(clip.visual.transformer, 'batch_first', True)
    kept = spatial_block_indices(len(blocks), spatial_blocks)
    last = blocks[-1]
    originals, spatial_means, semantics = [], [], []
    for window, window_ids in zip(x, ids, strict=True):  # one window at a time: a batch of one keeps the blocks'
        # in-projection a plain matrix product (a batch of several with a mask is a slow broadcast copy in bf16)
        inverse = torch.unique(nearest(window_ids.reshape(dino_grid), grid).reshape(-1), return_inverse=True)[1]
        count = int(inverse.max()) + 1
        mask = region_token_mask(F.one_hot(inverse, count).T.bool()[None], x.dtype)[0]  # (T, T)
        sequence = torch.cat([window[:1].expand(count, -1), window])[None]  # (1, R + 1 + N, D)
        sequence = sequence if batch_first else sequence.transpose(0, 1)
        spatial = []
        for index, block in enumerate(blocks[:-1]):
            sequence = block(sequence, attn_mask=mask)
            if index in kept:
                spatial.append(sequence)
        semantic = last(sequence, attn_mask=mask)
        if not batch_first:
            sequence, semantic = sequence.transpose(0, 1), semantic.transpose(0, 1)
            spatial = [out.transpose(0, 1) for out in spatial]
        originals.append(sequence[0, count:])
        spatial_means.append(torch.stack(spatial)[:, 0, count:].float().mean(dim=0).to(x.dtype))
        per_patch = nearest(inverse.reshape(grid), dino_grid).reshape(-1)  # the region of each DINO patch's CLIP cell
        semantics.append(semantic[0, :count][per_patch])
    batch = x.shape[0]
    originals = torch.stack(originals + spatial_means)  # (2B, 1 + N, D): main, then spatial
    width = clip.width
    attn = last.attn
    v = F.linear(last.ln_1(originals), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])[:, 1:]
    v = v.transpose(1, 2).reshape(2 * batch, width, *grid)
    if tuple(grid) != tuple(dino_grid):
        v = F.interpolate(v, size=tuple(dino_grid), mode='bilinear', align_corners=False)
    v = v.reshape(2, batch, width, -1).transpose(2, 3).contiguous()  # (2, B, M, D); a strided bf16 bmm copies slowly
    out = attn.out_proj(attention.to(v.dtype) @ v)  # (2, B, M, D)
    return WindowBranches(main=out[0], spatial=out[1], semantic=torch.stack(semantics))


def combine_branches(clip: ClipDense, branches: WindowBranches, spatial_weight: float,
                     semantic_weight: float) -> torch.Tensor:
    """``(ln_post(main) + w_s ln_post(spatial) + w_m ln_post(semantic)) @ proj``, L2-normalised: ``(B, M, E)``
    float32.
    """
    visual = clip.visual
    mixed = (visual.ln_post(branches.main) + spatial_weight * visual.ln_post(branches.spatial)
             + semantic_weight * visual.ln_post(branches.semantic))
    return F.normalize((mixed @ visual.proj).float(), dim=-1)


def map_correction(labels: torch.Tensor, ids: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Every region of ``ids`` but the smallest id takes its most frequent label (ties: the smallest label).

    Args:
        labels: ``(H, W)`` int64 labels ``0..num_labels - 1`` (0: below the threshold, which votes as 0).
        ids: ``(H, W)`` region ids (unmerged).
        num_labels: label values.

    Returns:
        ``(H, W)`` int64.
    """
    values, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
    flat = labels.reshape(-1)
    votes = torch.bincount(inverse * num_labels + flat, minlength=len(values) * num_labels)
    winner = votes.reshape(len(values), num_labels).argmax(dim=1)
    return torch.where(inverse == 0, flat, winner[inverse]).reshape(labels.shape)


class CorrclipMethod(Method):
    name = 'corrclip'
    models = ('clip', 'dino', 'sam')
    window_models = ('clip', 'dino')
    crop_field = 'windows.slide_crop'
    stride_field = 'windows.slide_stride'
    section = 'corrclip'
    params = CorrclipParams
    preset = MappingProxyType({'models.dino_model': 'vit_base_patch8_224.dino', 'windows.input_short_side': 336,
                               'windows.slide_crop': 336, 'windows.slide_stride': 112, 'labelling.logit_scale': 40.0,
                               'labelling.prob_thd': 0.0})
    """zdk258/CorrCLIP ``configs``: DINO ViT-B/8, short side 336, windows 336/112, logit scale 40, prob_thd 0."""
    summary = 'CLIP + DINO + SAM masks, CorrCLIP: region-scoped correlations, mask class tokens, map correction'

    def encode_image(self, frame: Frame) -> CorrclipFeatures:
        params: CorrclipParams = frame.config.section(self.section)
        models, windows = frame.models, frame.config.windows
        generate = mask_generator(params.mask_generator)
        ids = np.asarray(generate(frame.image, models.sam, params.mask_settings(), frame.stage))
        if ids.shape != frame.image.shape[:2] or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f'mask generator {params.mask_generator!r} returned a {ids.shape} {ids.dtype} map for a '
                             f'{frame.image.shape[:2]} image (expected an integer id map of the image size)')
        ids = torch.from_numpy(ids.astype(np.int32, copy=False))
        with frame.stage('windows'):
            resized, boxes, crops = cut_windows(frame.image, windows.input_short_side, windows.max_long_side,
                                                windows.slide_crop, windows.slide_stride, frame.patch, models.device)
            resized_ids = nearest(ids.to(models.device), tuple(resized.shape[1:]))
        with frame.stage('dino'):
            dino = F.normalize(models.dino.last_query_plus_key(
                normalise(crops, models.dino.mean, models.dino.std, models.dtype)).float(), dim=-1)  # (B, M, D)
        patch = models.dino.patch_size
        dino_grid = (windows.slide_crop // patch,) * 2
        with frame.stage('correlation'):
            window_ids = torch.stack([nearest(resized_ids[y0:y1, x0:x1], dino_grid).reshape(-1)
                                      for y0, x0, y1, x1 in boxes])  # (B, M)
            merged = torch.stack([merge_regions(unit, ids, params.merge_threshold)
                                  for unit, ids in zip(dino, window_ids, strict=True)])
            attention = torch.stack([scope_attention(unit @ unit.T, ids, params.tau)
                                     for unit, ids in zip(dino, merged, strict=True)])
        with frame.stage('clip'):
            branches = corrclip_branches(models.clip, normalise(crops, models.clip.mean, models.clip.std, models.dtype),
                                         merged, dino_grid, attention, params.spatial_blocks)
            features = combine_branches(models.clip, branches, params.spatial_weight, params.semantic_weight)
        with frame.stage('splice'):
            token_grid = (resized.shape[1] // patch, resized.shape[2] // patch)
            dense = splice_unit_features(features, dino_grid, boxes, token_grid, patch)
        return CorrclipFeatures(dense=dense, ids=ids)

    def label(self, probs: torch.Tensor, features: CorrclipFeatures, refined: torch.Tensor | None,
              labelling: Labelling) -> tuple[np.ndarray, np.ndarray]:
        """The thresholded argmax, then the map correction (:func:`map_correction`) on the cached id map."""
        labels, best = label_map(probs, labelling.config.labelling.prob_thd)
        if features.ids is None:
            return labels, best
        with labelling.stage('map_correction'):
            corrected = map_correction(torch.from_numpy(labels.astype(np.int64)), features.ids.cpu(),
                                       probs.shape[0] + 1)
            voted = probs.gather(0, (corrected - 1).clamp_(min=0).to(probs.device)[None])[0].float().cpu().numpy()
            confidence = np.where(corrected.numpy() > 0, voted, best)
            return corrected.numpy().astype(labels.dtype), confidence.astype(np.float32)


CORRCLIP = CorrclipMethod()
