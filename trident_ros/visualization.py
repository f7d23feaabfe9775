"""Colours for label images and an overlay with a legend (OpenCV drawing, RGB arrays)."""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

LEGEND_NAME_CHARS = 32


def class_colors(num_classes: int) -> np.ndarray:
    """``(num_classes + 1, 3)`` uint8 RGB, fixed and distinct: the PASCAL VOC bit-interleaved
    colour map (label 0 black, 1 dark red, 2 dark green, ...).
    """
    ids = np.arange(num_classes + 1)
    colors = np.zeros((num_classes + 1, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            colors[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return colors.astype(np.uint8)


def colorize(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """``(H, W)`` labels -> ``(H, W, 3)`` uint8 RGB."""
    return np.take(colors, labels, axis=0)  # colors[labels], ~5x faster


def _legend_text(name: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    text = name.encode('ascii', 'replace').decode('ascii')
    return text if len(text) <= LEGEND_NAME_CHARS else text[:LEGEND_NAME_CHARS - 3] + '...'


def draw_legend(image: np.ndarray, colors: np.ndarray, entries: Sequence[tuple[int, str]]) -> np.ndarray:
    """Draw, in place at the top-left of ``image (H, W, 3)`` uint8 RGB, a colour swatch and the name
    of each ``(label value, name)`` entry; entries that do not fit become ``+N more``.
    """
    if not entries:
        return image
    height, width = image.shape[:2]
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, float(np.clip(height / 960, 0.35, 1.0)), 1
    (_, text_h), baseline = cv2.getTextSize('Ag', font, scale, thickness)
    row = text_h + baseline + 4
    fit = max(1, (height - 4) // row)
    rows = [(colors[value], _legend_text(name)) for value, name in entries]
    if len(rows) > fit:
        rows = rows[:fit - 1] + [(None, f'+{len(entries) - fit + 1} more')]
    text_w = max(cv2.getTextSize(text, font, scale, thickness)[0][0] for _, text in rows)
    box_w, box_h = min(width, row + text_w + 8), min(height, row * len(rows) + 4)
    image[:box_h, :box_w] = (image[:box_h, :box_w].astype(np.float32) * 0.35).astype(np.uint8)
    for i, (color, text) in enumerate(rows):
        top = 2 + i * row
        if color is not None:
            cv2.rectangle(image, (3, top + 1), (row - 2, top + row - 3), tuple(int(c) for c in color), cv2.FILLED)
        cv2.putText(image, text, (row + 3, top + text_h + 2), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return image


def overlay(image_rgb: np.ndarray, labels: np.ndarray, colors: np.ndarray, legend: Sequence[tuple[int, str]],
            alpha: float = 0.5) -> np.ndarray:
    """``image_rgb (H, W, 3)`` uint8 blended with the colours of labelled pixels (``alpha`` = colour
    weight; unlabeled pixels unchanged), plus a legend of ``(label value, name)`` entries.
    """
    if image_rgb.shape[:2] != labels.shape or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f'image {image_rgb.shape} does not match labels {labels.shape}')
    blend = cv2.addWeighted(np.ascontiguousarray(image_rgb), 1.0 - alpha, colorize(labels, colors), alpha, 0.0)
    out = np.array(image_rgb, copy=True, order='C')
    np.copyto(out, blend, where=(labels > 0)[..., None])
    return draw_legend(out, colors, legend)
