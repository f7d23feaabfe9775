"""Depth in, labelled 3D out: depth to metres, back-projection, per-class statistics, cloud buffer.

Pure NumPy (no ROS). Points are in the camera's optical frame (REP 103: x right, y down, z
forward), the frame of a registered depth image (same pixel grid and optical frame as the colour
image, e.g. a RealSense ``aligned_depth_to_color`` stream). A depth of another size is resampled
(nearest) to the colour grid first, its intrinsics scaled with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLOUD_DTYPE = np.dtype({'names': ['x', 'y', 'z', 'label', 'confidence', 'rgb'],
                        'formats': ['<f4', '<f4', '<f4', '<u2', '<f4', '<f4'],
                        'offsets': [0, 4, 8, 12, 16, 20], 'itemsize': 24})
"""One point of the organized cloud: x, y, z (float32 metres, NaN without depth), label (uint16, the
label-image value), confidence (float32), rgb (the class colour packed as 0x00RRGGBB in a float32,
as RViz and PCL read it). Floats are 4-byte aligned (2 padding bytes after label): 24 bytes a point."""


class DepthError(ValueError):
    """A depth image or its intrinsics cannot be used; the message says why."""


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of an image of ``width`` x ``height`` pixels (pixel centres at integers)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    @classmethod
    def from_k(cls, k: np.ndarray | list[float], width: int, height: int) -> Intrinsics:
        """From a row-major 3x3 camera matrix (``sensor_msgs/CameraInfo.k``).

        Raises:
            DepthError: a non-positive or non-finite focal length, or a non-positive size.
        """
        k = np.asarray(k, dtype=np.float64).reshape(-1)
        if k.size != 9:
            raise DepthError(f'camera matrix has {k.size} values, not 9')
        intrinsics = cls(float(k[0]), float(k[4]), float(k[2]), float(k[5]), int(width), int(height))
        if not (np.isfinite([k[0], k[4], k[2], k[5]]).all() and k[0] > 0 and k[4] > 0):
            raise DepthError(f'camera matrix has no usable focal length (fx={k[0]}, fy={k[4]})')
        if width <= 0 or height <= 0:
            raise DepthError(f'intrinsics for an empty image ({width}x{height})')
        return intrinsics

    def scaled_to(self, width: int, height: int) -> Intrinsics:
        """The same camera on a ``width`` x ``height`` grid covering the same field of view."""
        sx, sy = width / self.width, height / self.height
        return Intrinsics(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5,
                          width, height)


@dataclass
class ClassPoints:
    """3D statistics of one class's valid points (camera optical frame, metres).

    Attributes:
        class_id: the class's value in the label image.
        position: ``(3,)`` per-axis median of its points.
        size: ``(3,)`` per-axis extent between the 5th and 95th percentiles.
        num_points: valid points (finite depth) of the class; 0: position and size are zero.
    """

    class_id: int
    position: np.ndarray
    size: np.ndarray
    num_points: int


def depth_to_metres(depth: np.ndarray, depth_scale: float, min_depth: float, max_depth: float) -> np.ndarray:
    """Depth in metres as ``(h, w)`` float32, NaN where there is no valid depth.

    ``depth`` is ``(h, w)`` uint16 in units of ``depth_scale`` metres (e.g. 16UC1 millimetres) or
    float32 metres (32FC1); 0, NaN, inf and depths outside ``[min_depth, max_depth]`` become NaN.

    Raises:
        DepthError: not a 2-D uint16 or float32 array.
    """
    if depth.ndim != 2:
        raise DepthError(f'depth must be (h, w), got shape {depth.shape}')
    if depth.dtype == np.uint16:
        metres = depth.astype(np.float32) * np.float32(depth_scale)
    elif depth.dtype == np.float32:
        metres = depth.astype(np.float32, copy=True)
    else:
        raise DepthError(f'depth must be uint16 or float32, got {depth.dtype}')
    with np.errstate(invalid='ignore'):
        invalid = ~((metres > 0) & (metres >= min_depth) & (metres <= max_depth))  # NaN compares False
    metres[invalid] = np.nan
    return metres


def resample_nearest(depth: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(h, w)`` depth on a ``height`` x ``width`` grid over the same field of view, nearest pixel.

    Depth is never interpolated across edges. The same array when the size already matches.
    """
    h, w = depth.shape
    if (h, w) == (height, width):
        return depth
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return depth[rows[:, None], cols[None, :]]


def back_project(depth_m: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
    """``(H, W)`` float32 metres (NaN: no depth) -> ``(H, W, 3)`` float32 points (x, y, z).

    Pixel (u, v) at depth z is ``((u - cx) z / fx, (v - cy) z / fy, z)``; NaN depth gives NaN points.

    Raises:
        DepthError: the intrinsics are for another size.
    """
    height, width = depth_m.shape
    if (intrinsics.width, intrinsics.height) != (width, height):
        raise DepthError(f'intrinsics are for {intrinsics.width}x{intrinsics.height}, depth is {width}x{height}')
    x_factor = ((np.arange(width, dtype=np.float32) - np.float32(intrinsics.cx)) / np.float32(intrinsics.fx))
    y_factor = ((np.arange(height, dtype=np.float32) - np.float32(intrinsics.cy)) / np.float32(intrinsics.fy))
    points = np.empty((height, width, 3), dtype=np.float32)
    np.multiply(depth_m, x_factor[None, :], out=points[..., 0])
    np.multiply(depth_m, y_factor[:, None], out=points[..., 1])
    points[..., 2] = depth_m
    return points


def class_points(labels: np.ndarray, points: np.ndarray) -> dict[int, ClassPoints]:
    """Per-class statistics of ``points (H, W, 3)`` grouped by ``labels (H, W)``.

    Every class present in ``labels`` gets an entry (0 = unlabeled is skipped); one without valid
    points has ``num_points == 0``. Percentiles are NumPy's (linear interpolation). The valid pixels
    are ordered by label once (a radix sort); then each axis of each class is one sort of a
    contiguous float32 run (NumPy's SIMD sort), which is faster than a multi-point partition.
    """
    flat_labels = labels.reshape(-1)
    present = np.flatnonzero(np.bincount(flat_labels))
    valid_labels = np.where(np.isfinite(points[..., 2]).reshape(-1), flat_labels, 0)  # no depth: as unlabeled
    counts = np.bincount(valid_labels, minlength=int(present[-1]) + 1 if len(present) else 1)
    starts = np.cumsum(counts) - counts
    order = np.argsort(valid_labels, kind='stable')  # every pixel; the run of label 0 is never read
    flat_points = points.reshape(-1, 3)
    axes = [flat_points[:, axis].take(order) for axis in range(3)]  # contiguous, grouped by class
    out: dict[int, ClassPoints] = {}
    for class_id in (int(c) for c in present if c > 0):
        count = int(counts[class_id])
        if count == 0:
            out[class_id] = ClassPoints(class_id, np.zeros(3, np.float32), np.zeros(3, np.float32), 0)
            continue
        runs = [np.sort(axis[starts[class_id]:starts[class_id] + count]) for axis in axes]
        low, median, high = (np.array([percentile_of_sorted(run, q) for run in runs], dtype=np.float32)
                             for q in (5.0, 50.0, 95.0))
        out[class_id] = ClassPoints(class_id, median, high - low, count)
    return out


def percentile_of_sorted(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` of an already sorted non-empty 1-D array (linear interpolation)."""
    position = q / 100.0 * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return float(values[low]) + (float(values[high]) - float(values[low])) * (position - low)


def packed_colors(colors: np.ndarray) -> np.ndarray:
    """``(K + 1, 3)`` uint8 RGB -> ``(K + 1,)`` float32 whose bits are 0x00RRGGBB (PointCloud2 ``rgb``)."""
    colors = colors.astype(np.uint32)
    return ((colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]).view(np.float32)


def cloud_points(points: np.ndarray, labels: np.ndarray, confidence: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """The organized cloud as an ``(H, W)`` array of :data:`CLOUD_DTYPE`.

    Its ``tobytes()`` is the PointCloud2 data, row-major like the label image.

    Args:
        points: ``(H, W, 3)`` float32, NaN where there is no depth.
        labels: ``(H, W)`` label image (0 = unlabeled).
        confidence: ``(H, W)`` float32 best-class probability.
        colors: ``(K + 1, 3)`` uint8 RGB per label value (``visualization.class_colors``).

    Raises:
        ValueError: the arrays do not share one ``(H, W)`` grid.
    """
    height, width = labels.shape
    if points.shape != (height, width, 3) or confidence.shape != (height, width):
        raise ValueError(f'points {points.shape}, labels {labels.shape}, confidence {confidence.shape} differ')
    cloud = np.empty((height, width), dtype=CLOUD_DTYPE)
    words = cloud.view(np.float32).reshape(height, width, 6)  # every 4-byte word of a point
    words[..., :3] = points
    words[..., 3] = labels.astype('<u4').view(np.float32)  # label (little-endian uint16) + zero padding
    words[..., 4] = confidence
    words[..., 5] = np.take(packed_colors(colors), labels)
    return cloud
