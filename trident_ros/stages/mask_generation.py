"""Mask generators: one frame -> an id map of regions (CorrCLIP's masks), as a small registry of their own.

A generator is a function registered under a name (:func:`register_mask_generator`); it gets the frame, the SAM the
node already loaded and the :class:`MaskSettings`, and returns the ``(H, W)`` id map of :func:`paint_id_map`.
The built-in ``sam`` is segment-anything's automatic mask generator (``SamAutomaticMaskGenerator``) on that SAM,
fed the image embedding of our own encoder (:meth:`~trident_ros.models.SamEncoder.encode`, one encoder pass per
frame) through :class:`EmbeddedPredictor` instead of running its own ``set_image``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from trident_ros.models import SamEncoder, SamImage

Stage = Callable[[str], AbstractContextManager[None]]
"""``with stage('name'): ...`` times a named stage of the frame."""


@dataclass(frozen=True)
class MaskSettings:
    """Settings of a point-grid automatic mask generator.

    Attributes:
        points_per_side: prompts per image side (``points_per_side ** 2`` point prompts).
        points_per_batch: prompts decoded at once (memory: 3 masks per prompt at SAM's 1024 px input).
        pred_iou_thresh: keep a mask whose predicted IoU exceeds this.
        stability_score_thresh: keep a mask whose stability score is at least this.
        box_nms_thresh: box IoU above which the lower-scored of two masks is dropped.
    """

    points_per_side: int = 8
    points_per_batch: int = 16
    pred_iou_thresh: float = 0.7
    stability_score_thresh: float = 0.7
    box_nms_thresh: float = 0.7


MaskGenerator = Callable[[np.ndarray, SamEncoder, MaskSettings, Stage], np.ndarray]
"""``(image (H, W, 3) uint8 RGB, sam, settings, stage) -> (H, W) int32 id map`` (:func:`paint_id_map`)."""

_GENERATORS: dict[str, MaskGenerator] = {}


def register_mask_generator(name: str, generator: MaskGenerator) -> MaskGenerator:
    """Add ``generator`` under ``name`` (returned).

    Raises:
        ValueError: the name is empty or taken by another generator.
    """
    if not name:
        raise ValueError('a mask generator needs a name')
    if _GENERATORS.get(name, generator) is not generator:
        raise ValueError(f'a mask generator named {name!r} is already registered')
    _GENERATORS[name] = generator
    return generator


def mask_generator(name: str) -> MaskGenerator:
    """The generator registered as ``name``.

    Raises:
        KeyError: no such generator (the message lists the registered ones).
    """
    if name not in _GENERATORS:
        raise KeyError(f'unknown mask generator {name!r}: one of {", ".join(_GENERATORS)}')
    return _GENERATORS[name]


def mask_generator_names() -> tuple[str, ...]:
    """Every registered mask generator."""
    return tuple(_GENERATORS)


def paint_id_map(masks: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Paint masks into one id map, smallest area first: a larger mask overwrites the smaller ones it covers.

    Masks sorted by area ascending (a stable sort: equal areas keep their order) get ids ``1..n`` in that order;
    pixels no mask covers stay 0. A nested part survives only where it sticks out of the masks painted after it.

    Args:
        masks: ``(H, W)`` bool masks.
        size: ``(H, W)``.

    Returns:
        ``(H, W)`` int32 id map.
    """
    ids = np.zeros(size, dtype=np.int32)
    for index, order in enumerate(sorted(range(len(masks)), key=lambda i: int(masks[i].sum())), start=1):
        ids[masks[order]] = index
    return ids


class EmbeddedPredictor(SamPredictor):
    """segment-anything's ``SamPredictor`` whose image embedding is one we computed.

    ``set_image`` takes the embedding of ``image`` instead of running SAM's encoder, for an image of the encoded
    size (the automatic generator's one crop, the whole frame, with ``crop_n_layers`` 0).
    """

    def __init__(self, model: torch.nn.Module, image: SamImage) -> None:
        super().__init__(model)
        self.embedded = image

    def set_image(self, image: np.ndarray, image_format: str = 'RGB') -> None:
        """Adopt the embedding (``image``: the ``(H, W, 3)`` frame it was computed from, checked by its size)."""
        embedded = self.embedded
        if tuple(image.shape[:2]) != tuple(embedded.original_size):
            raise ValueError(f'the embedding is of a {embedded.original_size} image, not {image.shape[:2]}')
        self.reset_image()
        self.original_size = tuple(embedded.original_size)
        self.input_size = tuple(embedded.input_size)
        self.features = embedded.embedding.to(self.device, torch.float32)
        self.is_image_set = True


def sam_automatic_masks(image: np.ndarray, sam: SamEncoder, settings: MaskSettings, stage: Stage) -> np.ndarray:
    """segment-anything's automatic mask generator on one SAM encoder pass (ours), painted into an id map.

    One crop (the image), ``points_per_side ** 2`` point prompts of 3 masks each, filtered by predicted IoU and
    stability, box NMS; then :func:`paint_id_map`. Stages ``sam_encoder`` and ``mask_generator``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        sam: the loaded SAM.
        settings: the generator's settings.
        stage: times the stages.

    Returns:
        ``(H, W)`` int32 id map.
    """
    with stage('sam_encoder'):
        embedded = sam.encode(image)
    with stage('mask_generator'):
        generator = SamAutomaticMaskGenerator(
            sam.model, points_per_side=settings.points_per_side, points_per_batch=settings.points_per_batch,
            pred_iou_thresh=settings.pred_iou_thresh, stability_score_thresh=settings.stability_score_thresh,
            box_nms_thresh=settings.box_nms_thresh, crop_n_layers=0)
        generator.predictor = EmbeddedPredictor(sam.model, embedded)
        records = generator.generate(image)
        return paint_id_map([record['segmentation'] for record in records], image.shape[:2])


register_mask_generator('sam', sam_automatic_masks)
