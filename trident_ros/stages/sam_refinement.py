"""Refine coarse class probabilities by prompting SAM with every class region at once.

The reference's ``sam_refinement``, step by step, with its loop over classes replaced by one
prompt-encoder call for all regions of the frame and mask-decoder calls on batches of regions:

1. The coarse label is the argmax of the probabilities at full size, class 0 where the best
   probability is below ``prob_thd`` (the reference refines its thresholded prediction, in which
   those pixels are class 0). The probabilities are downsampled by 2 (bilinear), the label by
   nearest neighbour. Pixels whose best downsampled probability is below ``coarse_thresh`` are
   dropped, and so are classes whose best downsampled probability anywhere is below it.
2. Each class mask splits into 8-connected regions; regions of at least ``minimal_area`` pixels
   prompt SAM with their box, their highest-probability point (label 1) and the class's mask
   prompt: the class probability map resized to the mask-prompt size on the long side, padded,
   ``sam_mask_coff * p`` where ``p > coarse_thresh`` else 0. One mask per prompt.
3. Masks whose predicted IoU exceeds ``sam_iou_thresh`` are kept. A class's refined score is the
   max over its kept masks of sigmoid(mask logits) times its coarse probability, and 0 outside
   the union of those masks. Where a kept mask of any class covers a pixel, its label is the
   argmax of the refined scores (``prob_thd`` does not apply there); elsewhere the coarse label
   stays. Rejected masks change no label: the reference merges the coarse probabilities of their
   regions into its scores (``map_failed_regions``), but its label test compares a value with the
   maximum it was just merged into, so it never fires; inside a rejected region that a kept mask
   covers, the refined label stands.

Mask prompts: the reference passes each class's prompt as a (1, S, S) tensor, which
``torch.nn.Conv2d`` treats as unbatched, so SAM's ``LayerNorm2d`` in the mask encoder normalises
over rows instead of channels. This changes the dense embedding a lot (the tiny prompt values
are scaled up to unit size instead of being washed out), so it is reproduced exactly: the mask
encoder is vmapped over the classes, each seeing the same (1, S, S) input as in the reference.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

logger = logging.getLogger(__name__)

DOWN_RATIO = 2
"""Regions and prompts are found on the maps downsampled by this factor (as in the reference)."""
DECODE_BATCH_CPU = 4
"""Regions per mask-decoder call on the CPU. The decoder copies the (256, 64, 64) image embedding
and its positional encoding per region and runs its two-way transformer over all 4096 image
tokens of each region (~33 MiB per region at full scale in fp32); batches of 4 keep that near
135 MiB for any number of regions, and are faster than one batch of all regions (the working set
stays in cache: 14 regions, 0.6 s instead of 1.0 s on this project's CPU; docs/performance.md)."""
DECODE_BATCH_CUDA = 32
"""The same on CUDA, where larger batches use the GPU better (not measured: no GPU so far)."""


@dataclass(frozen=True)
class RefinementParams:
    """Thresholds of SAM refinement (reference defaults).

    Attributes:
        coarse_thresh: pixels and classes whose best probability is lower take no part.
        minimal_area: smallest region (pixels at half resolution) that prompts SAM.
        sam_mask_coff: factor on the probabilities of the mask prompt.
        sam_iou_thresh: a mask is kept when its predicted IoU exceeds this (any finite value; SAM's
            predicted IoU is not bounded to [0, 1]).
        prob_thd: pixels whose best probability is lower are class 0 in the coarse label the
            regions are cut from (as in the reference's thresholded prediction).
    """

    coarse_thresh: float = 0.2
    minimal_area: int = 225
    sam_mask_coff: float = 0.005
    sam_iou_thresh: float = 0.8
    prob_thd: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> RefinementParams:
        """A :class:`~trident_ros.config.TridentConfig`'s section ``refinement`` and ``labelling.prob_thd``."""
        section = config.refinement
        return cls(coarse_thresh=section.coarse_thresh, minimal_area=section.minimal_area,
                   sam_mask_coff=section.sam_mask_coff, sam_iou_thresh=section.sam_iou_thresh,
                   prob_thd=config.labelling.prob_thd)


@dataclass
class Refinement:
    """Result of :func:`refine_with_sam`.

    Attributes:
        scores: (K, H, W) scores whose argmax is the refined label: the refined class scores where
            ``refined``, the coarse probabilities elsewhere.
        refined: (H, W) bool, True where a kept SAM mask covers the pixel (the reference applies
            ``prob_thd`` only to the other, coarse pixels).
    """

    scores: torch.Tensor
    refined: torch.Tensor


@dataclass
class Regions:
    """Connected class regions on the half-resolution grid.

    Attributes:
        classes: (R,) int64 class of each region.
        boxes: (R, 4) float32 ``x0, y0, x1, y1`` (inclusive pixel bounds, like ``masks_to_boxes``).
        points: (R, 2) float32 ``x, y`` of the region's highest class probability (first in raster
            order on ties).
    """

    classes: torch.Tensor
    boxes: torch.Tensor
    points: torch.Tensor


def find_regions(labels: torch.Tensor, probs: torch.Tensor, minimal_area: int) -> Regions:
    """Split every class of a label map into 8-connected regions of at least ``minimal_area`` pixels.

    Args:
        labels: (h, w) integer class per pixel, negative for pixels that take no part.
        probs: (K, h, w) class probabilities (for the prompt points).
        minimal_area: smallest region kept, in pixels.

    Returns:
        Regions, ordered by class, then by cv2's component order; tensors on ``probs.device``.
    """
    height, width = labels.shape
    label_np = labels.cpu().numpy()
    index = np.full((height, width), -1, dtype=np.int64)
    classes: list[np.ndarray] = []
    boxes: list[np.ndarray] = []
    count = 0
    for cls in np.unique(label_np[label_np >= 0]):
        components, component_map, stats, _ = cv2.connectedComponentsWithStats(
            (label_np == cls).astype(np.uint8), connectivity=8)
        large = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= minimal_area) + 1
        if large.size == 0:
            continue
        lookup = np.full(components, -1, dtype=np.int64)
        lookup[large] = count + np.arange(large.size)
        region_map = lookup[component_map]
        index = np.where(region_map >= 0, region_map, index)
        x, y, w, h = stats[large, :4].T
        boxes.append(np.stack([x, y, x + w - 1, y + h - 1], axis=1))
        classes.append(np.full(large.size, cls, dtype=np.int64))
        count += large.size

    device = probs.device
    index_t = torch.from_numpy(index).to(device)
    classes_t = torch.from_numpy(np.concatenate(classes) if classes else np.zeros(0, np.int64)).to(device)
    boxes_t = torch.from_numpy(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.int64)).float().to(device)

    flat = index_t.reshape(-1)
    pixels = torch.nonzero(flat >= 0).squeeze(1)
    owner = flat[pixels]
    value = probs.reshape(probs.shape[0], -1)[classes_t[owner], pixels]
    best = value.new_full((count,), float('-inf')).scatter_reduce(0, owner, value, 'amax')
    ties = value == best[owner]
    first = pixels.new_full((count,), height * width).scatter_reduce(0, owner[ties], pixels[ties], 'amin')
    points = torch.stack([first % width, first // width], dim=1).float()
    return Regions(classes=classes_t, boxes=boxes_t, points=points)


def mask_prompts(probs: torch.Tensor, original_size: tuple[int, int], mask_size: tuple[int, int],
                 coarse_thresh: float, coff: float) -> torch.Tensor:
    """SAM mask prompts of class probability maps.

    Args:
        probs: (C, h, w) probability maps (half resolution).
        original_size: (H, W) of the image; its aspect ratio decides the resized map's size.
        mask_size: SAM's mask-prompt size (S, S), 256x256 for the released models.
        coarse_thresh: values not above this become 0.
        coff: factor on the values kept.

    Returns:
        (C, 1, S, S): the maps resized bilinearly to S on the long side, padded with zeros at the
        bottom/right, ``coff * p`` where ``p > coarse_thresh`` else 0.
    """
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], mask_size[0])
    new_h, new_w = max(new_h, 1), max(new_w, 1)  # an extreme aspect ratio (2x3000) would round to 0
    resized = F.interpolate(probs[:, None], size=(new_h, new_w), mode='bilinear', align_corners=False)
    padded = F.pad(resized, (0, mask_size[1] - new_w, 0, mask_size[0] - new_h))
    return torch.where(padded > coarse_thresh, coff * padded, torch.zeros((), dtype=padded.dtype, device=padded.device))


def decode_batch(device: torch.device) -> int:
    """Regions per mask-decoder call: :data:`DECODE_BATCH_CPU` or :data:`DECODE_BATCH_CUDA`."""
    return DECODE_BATCH_CUDA if device.type == 'cuda' else DECODE_BATCH_CPU


Decoder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""An exported prompt encoder + mask decoder: ``(embedding (1, C, G, G), points (R, 3, 2) in SAM's input frame (the
peak point, then the box corners), dense prompts (R, C, G, G)) -> (low-res logits (R, 1, S, S), IoU (R, 1))``."""


def _decode(sam: Sam, image_embedding: torch.Tensor, regions: Regions, prompts: torch.Tensor, slot: torch.Tensor,
            prompt_frame: tuple[int, int], decoder: Decoder | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All regions through SAM's prompt encoder in one batch, then its mask decoder in batches.

    Batches of :func:`decode_batch` regions (each region's output does not depend on the batch); with ``decoder``
    (an exported graph) its prompt encoder and mask decoder run there, all regions in one call.

    Args:
        sam: the segment-anything model.
        image_embedding: (1, C, G, G) SAM image embedding of the frame.
        regions: the regions (boxes, points, classes) that prompt SAM.
        prompts: (C, 1, S, S) mask prompt of each class present in ``regions``.
        slot: (R,) which of the C prompts each region uses.
        prompt_frame: (h, w) the regions' coordinates refer to; mapped to SAM's input frame.
        decoder: the exported prompt encoder and mask decoder, or None (torch).

    Returns:
        low-resolution mask logits (R, 1, S, S) and predicted IoUs (R,).
    """
    encoder_dtype = sam.prompt_encoder.point_embeddings[0].weight.dtype
    decoder_dtype = sam.mask_decoder.iou_token.weight.dtype
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    count = regions.classes.shape[0]
    coords = transform.apply_coords_torch(regions.points[:, None], prompt_frame)  # (R, 1, 2)
    boxes = transform.apply_boxes_torch(regions.boxes, prompt_frame)  # (R, 4)
    # (1, S, S) per class, as the reference feeds it (see the module docstring)
    dense_per_class = torch.func.vmap(sam.prompt_encoder.mask_downscaling)(prompts.to(encoder_dtype))
    if decoder is not None:
        low_res, iou = decoder(image_embedding, torch.cat([coords, boxes.view(-1, 2, 2)], dim=1), dense_per_class[slot])
        return low_res, iou[:, 0]
    point_labels = torch.ones(count, 1, device=coords.device)
    sparse, _ = sam.prompt_encoder(points=(coords, point_labels), boxes=boxes, masks=None)
    embedding = image_embedding.to(decoder_dtype)
    position = sam.prompt_encoder.get_dense_pe().to(decoder_dtype)
    low_res, iou = [], []
    for group in torch.arange(count, device=slot.device).split(decode_batch(embedding.device)):
        group_low_res, group_iou = sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=position,
            sparse_prompt_embeddings=sparse[group].to(decoder_dtype),
            dense_prompt_embeddings=dense_per_class[slot[group]].to(decoder_dtype),
            multimask_output=False,
        )
        low_res.append(group_low_res)
        iou.append(group_iou[:, 0])
    return torch.cat(low_res), torch.cat(iou)


@torch.inference_mode()
def refine_with_sam(probs: torch.Tensor, sam: Sam, image_embedding: torch.Tensor, input_size: tuple[int, int],
                    original_size: tuple[int, int], params: RefinementParams,
                    decoder: Decoder | None = None) -> Refinement:
    """Refine coarse class probabilities with SAM masks (see the module docstring).

    Args:
        probs: (K, H, W) coarse class probabilities at the image's size.
        sam: segment-anything model (its prompt encoder, mask decoder and ``postprocess_masks``;
            the prompt encoder must be float32, as upstream's point encoding needs).
        image_embedding: (1, C, G, G) SAM image embedding of the frame.
        input_size: (h, w) of the image inside SAM's padded input (after ResizeLongestSide).
        original_size: (H0, W0) of the image SAM encoded; masks are upsampled to it, then
            bilinearly to (H, W) when that differs (the reference encodes the image with sides
            rounded up to multiples of 16).
        params: thresholds.
        decoder: SAM's prompt encoder and mask decoder as an exported graph (:data:`Decoder`), or None (torch).

    Returns:
        Refinement: (K, H, W) scores, dtype of ``probs``, whose argmax is the refined label
        (refined scores where a kept mask covers the pixel, otherwise the coarse probabilities),
        and the (H, W) mask of pixels whose score is a refined one. Its max is the confidence of
        the label: the label's refined score where refined, its coarse probability elsewhere.

    Work is done in float32 whatever the dtype of ``probs`` (as in the reference): the mask
    prompt's tiny values are normalised by the mask encoder, so fp16 rounding would show.
    """
    scores, refined = _refine(probs.float(), sam, image_embedding, input_size, original_size, params, decoder)
    return Refinement(scores.to(probs.dtype), refined)


def _refine(probs: torch.Tensor, sam: Sam, image_embedding: torch.Tensor, input_size: tuple[int, int],
            original_size: tuple[int, int], params: RefinementParams,
            decoder: Decoder | None) -> tuple[torch.Tensor, torch.Tensor]:
    """refine_with_sam on float32 probabilities: (scores (K, H, W), refined pixels (H, W))."""
    classes, height, width = probs.shape
    unrefined = torch.zeros(height, width, dtype=torch.bool, device=probs.device)
    down_h, down_w = height // DOWN_RATIO, width // DOWN_RATIO
    if down_h == 0 or down_w == 0:
        return probs, unrefined
    best, labels = probs.max(dim=0)  # the first index on ties, as argmax; torch's argmax over dim 0 is ~30x slower
    labels = labels.masked_fill(best < params.prob_thd, 0)
    labels_down = F.interpolate(labels[None, None].float(), size=(down_h, down_w), mode='nearest')[0, 0].long()
    probs_down = F.interpolate(probs[None], size=(down_h, down_w), mode='bilinear', align_corners=False)[0]
    weak_class = probs_down.amax(dim=(1, 2)) < params.coarse_thresh
    dropped = (probs_down.amax(dim=0) < params.coarse_thresh) | weak_class[labels_down]
    regions = find_regions(labels_down.masked_fill(dropped, -1), probs_down, params.minimal_area)
    if regions.classes.numel() == 0:
        return probs, unrefined

    present, slot = torch.unique(regions.classes, return_inverse=True)
    prompts = mask_prompts(probs_down[present], (height, width), sam.prompt_encoder.mask_input_size,
                           params.coarse_thresh, params.sam_mask_coff)
    low_res, iou = _decode(sam, image_embedding, regions, prompts, slot, (down_h, down_w), decoder)
    kept = iou > params.sam_iou_thresh
    logger.debug('SAM refinement: %d regions, %d masks kept', kept.numel(), int(kept.sum()))
    if not bool(kept.any()):
        return probs, unrefined

    logits = sam.postprocess_masks(low_res[kept], tuple(input_size), tuple(original_size))
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode='bilinear', align_corners=False)
    return combine_masks(probs, logits[:, 0], regions.classes[kept], sam.mask_threshold)


def combine_masks(probs: torch.Tensor, logits: torch.Tensor, mask_class: torch.Tensor,
                  mask_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Refined scores from the kept SAM masks (the reference's ``map_refinement_coarse`` and the merge after it).

    A class's refined score is the max over its masks of ``sigmoid(logits) * probs[class]``, 0
    outside the union of its masks (``logits > mask_threshold``). Pixels that some mask covers take
    the refined scores; the others keep the coarse probabilities.

    Args:
        probs: (K, H, W) float32 coarse class probabilities.
        logits: (Rk, H, W) mask logits of the kept masks at the probabilities' size.
        mask_class: (Rk,) int64 class of each mask.
        mask_threshold: SAM's mask threshold on the logits.

    Returns:
        Scores (K, H, W) whose argmax is the label, and the (H, W) bool mask of refined pixels.
    """
    _, height, width = probs.shape
    owner = mask_class.view(-1, 1, 1).expand(-1, height, width)  # class of each mask, per pixel (a view)
    score = logits.sigmoid().float() * probs[mask_class]  # (Rk, H, W)
    refined = torch.zeros_like(probs).scatter_reduce_(0, owner, score, 'amax')
    inside = (logits > mask_threshold).float()
    refined = refined * torch.zeros_like(probs).scatter_reduce_(0, owner, inside, 'amax')  # 0 outside the union
    refined_pixels = refined.sum(dim=0) > 0
    return torch.where(refined_pixels, refined, probs), refined_pixels
