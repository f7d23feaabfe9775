"""From dense features to class probabilities, a label image and per-class masks.

Label images use ``0`` for unlabeled pixels and ``k + 1`` for class ``k`` of the vocabulary.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from trident_ros.visualization import class_colors, colorize, overlay
from trident_ros.vocabulary import Vocabulary

NAME_CHUNK = 64
"""Names upsampled at once in :func:`class_probabilities` (memory: NAME_CHUNK x H x W floats)."""


@torch.inference_mode()
def class_probabilities(dense: torch.Tensor, vocabulary: Vocabulary, out_size: tuple[int, int],
                        logit_scale: float = 40.0,
                        logit_filter: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-class probabilities at ``out_size``, as the reference labels pixels.

    Cosine logits per name are upsampled bilinearly to ``out_size``, a softmax over all names of
    the vocabulary is taken with ``logit_scale``, and a class's probability is the max over its
    own names. Computed as ``exp(max_own_names(s * l) - logsumexp_all_names(s * l))`` in chunks of
    names, so the ``(names, H, W)`` softmax is never materialised.

    Args:
        dense: ``(E, hs, ws)`` L2-normalised dense features.
        vocabulary: text features ``(N, E)`` and ``name_to_class (N,)``.
        out_size: ``(H, W)``.
        logit_scale: softmax temperature.
        logit_filter: applied to each chunk of upsampled cosine logits ``(n, H, W)`` before the
            scale (a per-name refinement such as PAMR); None: none.

    Returns:
        ``(K, H, W)`` float32 probabilities, K = number of classes.
    """
    text = vocabulary.text_features.to(device=dense.device, dtype=torch.float32)
    logits = torch.einsum('ehw,ne->nhw', dense.float(), text)  # (N, hs, ws)
    name_to_class = vocabulary.name_to_class.to(dense.device)
    height, width = out_size
    class_max = logits.new_full((vocabulary.num_classes, height, width), float('-inf'))
    log_norm: torch.Tensor | None = None
    for start in range(0, logits.shape[0], NAME_CHUNK):
        scaled = F.interpolate(logits[None, start:start + NAME_CHUNK], size=out_size, mode='bilinear',
                               align_corners=False)[0]  # (n, H, W)
        if logit_filter is not None:
            scaled = logit_filter(scaled)
        scaled = scaled * logit_scale
        index = name_to_class[start:start + NAME_CHUNK].view(-1, 1, 1).expand_as(scaled)
        class_max.scatter_reduce_(0, index, scaled, reduce='amax')
        chunk_norm = torch.logsumexp(scaled, dim=0)
        log_norm = chunk_norm if log_norm is None else torch.logaddexp(log_norm, chunk_norm)
    return (class_max - log_norm).exp_()


@torch.inference_mode()
def label_map(probs: torch.Tensor, prob_thd: float,
              exempt: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label image and confidence from ``(K, H, W)`` class probabilities.

    ``exempt``: optional (H, W) bool of pixels ``prob_thd`` does not apply to (SAM-refined ones).

    Returns:
        ``labels (H, W)``: argmax + 1, or 0 where the best probability is below ``prob_thd``;
        uint8 when K <= 255, else uint16. ``confidence (H, W)`` float32: the best probability.
    """
    num_classes = probs.shape[0]
    if num_classes > np.iinfo(np.uint16).max:
        raise ValueError(f'{num_classes} classes do not fit a uint16 label image')
    best, index = probs.max(dim=0)
    below = best < prob_thd
    if exempt is not None:
        below &= ~exempt
    labels = (index + 1).masked_fill_(below, 0)
    dtype = np.uint8 if num_classes <= np.iinfo(np.uint8).max else np.uint16
    return labels.cpu().numpy().astype(dtype), best.float().cpu().numpy()


@dataclass
class ClassMask:
    """One class present in a label image.

    Attributes:
        label: the class's display name.
        class_id: its value in the label image (class index + 1).
        score: mean class probability over the mask.
        area: pixels in the mask.
        bbox: ``(x, y, width, height)`` of the mask.
        mask: ``(height, width)`` bool, cropped to ``bbox``.
    """

    label: str
    class_id: int
    score: float
    area: int
    bbox: tuple[int, int, int, int]
    mask: np.ndarray


def class_masks(labels: np.ndarray, scores: np.ndarray | torch.Tensor, names: Sequence[str]) -> list[ClassMask]:
    """The classes present in ``labels``, in class-id order.

    Args:
        labels: ``(H, W)`` label image (0 unlabeled, ``k + 1`` for ``names[k]``).
        scores: ``(H, W)`` probability of each pixel's label (``label_map``'s confidence), or the
            ``(K, H, W)`` class probabilities; a mask's score is their mean over the mask.
        names: display name per class.
    """
    height, width = labels.shape
    num_ids = len(names) + 1
    flat = labels.ravel().astype(np.int64)
    if flat.size and flat.max() >= num_ids:
        raise ValueError(f'label {flat.max()} has no name ({len(names)} classes)')
    areas = np.bincount(flat, minlength=num_ids)
    sums = np.bincount(flat, weights=_label_scores(labels, scores).ravel().astype(np.float64), minlength=num_ids)
    # which classes occur in each row / each column: (H, num_ids) and (W, num_ids) counts
    rows = np.bincount(np.repeat(np.arange(height), width) * num_ids + flat,
                       minlength=height * num_ids).reshape(height, num_ids) > 0
    cols = np.bincount(np.tile(np.arange(width), height) * num_ids + flat,
                       minlength=width * num_ids).reshape(width, num_ids) > 0
    y0, y1 = rows.argmax(axis=0), height - 1 - rows[::-1].argmax(axis=0)
    x0, x1 = cols.argmax(axis=0), width - 1 - cols[::-1].argmax(axis=0)
    masks = []
    for class_id in np.flatnonzero(areas[1:]) + 1:
        top, bottom, left, right = int(y0[class_id]), int(y1[class_id]), int(x0[class_id]), int(x1[class_id])
        masks.append(ClassMask(
            label=names[class_id - 1],
            class_id=int(class_id),
            score=float(sums[class_id] / areas[class_id]),
            area=int(areas[class_id]),
            bbox=(left, top, right - left + 1, bottom - top + 1),
            mask=labels[top:bottom + 1, left:right + 1] == class_id,
        ))
    return masks


def _label_scores(labels: np.ndarray, scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(H, W)`` probability of each pixel's own label (any value where unlabeled)."""
    if scores.ndim == 2:
        return np.asarray(scores)
    probs = torch.as_tensor(scores)
    index = torch.from_numpy(labels.astype(np.int64)).to(probs.device).sub_(1).clamp_(min=0)
    return probs.gather(0, index[None])[0].float().cpu().numpy()


@dataclass
class Segmentation:
    """One labelled frame.

    Attributes:
        labels: ``(H, W)`` uint8/uint16, 0 unlabeled, ``k + 1`` for ``vocabulary[k]``.
        confidence: ``(H, W)`` float32 probability of each pixel's best class.
        masks: the classes present, in class-id order.
        vocabulary: display name per class.
        timings: seconds per pipeline stage.
    """

    labels: np.ndarray
    confidence: np.ndarray
    masks: list[ClassMask]
    vocabulary: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def colors(self) -> np.ndarray:
        """``(K + 1, 3)`` uint8 RGB colour per label value (0: black)."""
        return class_colors(len(self.vocabulary))

    def color_image(self) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB label image in :attr:`colors`."""
        return colorize(self.labels, self.colors)

    def overlay(self, image_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """``(H, W, 3)`` uint8: ``image_rgb`` blended with the class colours, plus a legend."""
        legend = [(mask.class_id, mask.label) for mask in self.masks]
        return overlay(image_rgb, self.labels, self.colors, legend, alpha)
