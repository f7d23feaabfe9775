"""ROS messages <-> NumPy arrays for the trident node (no node, no pipeline here).

Input images are decoded by :mod:`trident_ros.image_decoding` (checks, encodings, size limits, the
decompression-bomb guard; the same code decodes bags), its raw rows by ``cv_bridge`` where it is
installed AND works (a ROS 2 install), else by ``rosbags-image`` (:data:`IMAGE_BACKEND`).
"""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from geometry_msgs.msg import Point, Vector3
from sensor_msgs.msg import Image, RegionOfInterest
from std_msgs.msg import Header

from trident_ros import image_decoding
from trident_ros.msg import ClassMask as ClassMaskMsg
from trident_ros.msg import ClassMaskArray, VocabularyInfo


def vision_msgs_missing(error: ImportError) -> str:
    """What the node says at configure when vision_msgs does not import (``error``: why)."""
    return (f'vision_msgs cannot be imported ({error}): ~/label_info (vision_msgs/LabelInfo, read by Nav2\'s '
            'semantic_segmentation_layer) and ~/detections_3d (vision_msgs/Detection3DArray) are not published. '
            'Install it (ros-<distro>-vision-msgs), or run tools/setup.sh, which builds it from its definitions')


def _import_vision_msgs() -> tuple[Any, str]:
    """``vision_msgs.msg`` and '', or None and :func:`vision_msgs_missing`'s text."""
    try:
        from vision_msgs import msg
    except ImportError as error:
        return None, vision_msgs_missing(error)
    return msg, ''


vision_msgs, VISION_MSGS_MISSING = _import_vision_msgs()
"""The one import of vision_msgs (a distro's, or the one tools/setup.sh builds): its ``msg`` module or None,
and the warning the node gives at configure without it ('' with it)."""
LabelInfo = vision_msgs.LabelInfo if vision_msgs is not None else None


def _cv_bridge_decoder() -> image_decoding.RawDecoder | None:
    """``cv_bridge``'s ``imgmsg_to_cv2(msg, 'rgb8')`` if it imports and decodes a probe image."""
    try:
        from cv_bridge import CvBridge
    except ImportError:
        return None
    bridge = CvBridge()

    def decode(encoding: str, height: int, width: int, bigendian: bool, data: np.ndarray) -> np.ndarray:
        msg = Image(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian),
                    step=len(data) // height, data=data.tobytes())
        return bridge.imgmsg_to_cv2(msg, desired_encoding='rgb8')

    try:
        probe = np.arange(12, dtype=np.uint8)
        if not np.array_equal(decode('bgr8', 2, 2, False, probe), probe.reshape(2, 2, 3)[..., ::-1]):
            return None
    except Exception:  # a broken cv_bridge (e.g. the ROS 1 build on PyPI) must not be used
        return None
    return decode


_BRIDGE = _cv_bridge_decoder()
IMAGE_BACKEND = 'cv_bridge' if _BRIDGE is not None else 'rosbags-image'
"""Which library decodes the rows of a ``sensor_msgs/Image`` in this process."""
_DECODE = _BRIDGE or image_decoding.decode_with_rosbags


def image_to_rgb(msg: Image, max_pixels: int) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` into a new ``(H, W, 3)`` uint8 RGB array, rows by :data:`IMAGE_BACKEND`.

    Raises:
        ImageConversionError: see :func:`trident_ros.image_decoding.image_to_rgb`.
    """
    return image_decoding.image_to_rgb(msg, max_pixels, _DECODE)


def array_to_image(array: np.ndarray, encoding: str, header: Header) -> Image:
    """An ``(H, W)`` or ``(H, W, C)`` array as a ``sensor_msgs/Image`` (native byte order)."""
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder('='), copy=False))
    height, width = array.shape[:2]
    msg = Image(header=header, height=height, width=width, encoding=encoding,
                is_bigendian=int(sys.byteorder == 'big' and array.itemsize > 1), step=array.strides[0])
    msg.data = array.tobytes()  # bytes: rclpy's fast path (a memoryview is copied element by element)
    return msg


def labels_to_image(labels: np.ndarray, num_classes: int, header: Header) -> Image:
    """``(H, W)`` label image (0 = unlabeled, class k -> k + 1) as mono8, or mono16 past 255 classes."""
    if num_classes <= 255:
        return array_to_image(labels.astype(np.uint8, copy=False), 'mono8', header)
    return array_to_image(labels.astype(np.uint16, copy=False), 'mono16', header)


def confidence_to_image(confidence: np.ndarray, header: Header) -> Image:
    """``(H, W)`` float confidence in [0, 1] as mono8 0..255 (rounded)."""
    scaled = np.clip(np.rint(np.asarray(confidence, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return array_to_image(scaled, 'mono8', header)


def class_masks_to_msg(masks: Sequence[Any], vocabulary: Sequence[str], header: Header,
                       points: Mapping[int, Any] | None = None, frame_3d: str = '') -> ClassMaskArray:
    """Per-class masks as a ``trident_ros/ClassMaskArray``, masks mono8 255 inside.

    Args:
        masks: ``labelling.ClassMask`` (label, class_id, score, area, bbox (x, y, w, h), mask bool
            (h, w) cropped to bbox).
        vocabulary: display name per class.
        header: the input image's header.
        points: ``projection.ClassPoints`` per class id (position, size, num_points), or None: no 3D.
        frame_3d: the frame of those points (empty without 3D).

    Raises:
        ValueError: a mask does not have its bbox's shape.
    """
    points = points or {}
    out = ClassMaskArray(header=header, vocabulary=list(vocabulary), frame_3d=frame_3d if points else '')
    for mask in sorted(masks, key=lambda m: m.class_id):
        x, y, w, h = (int(v) for v in mask.bbox)
        pixels = np.asarray(mask.mask, dtype=bool)
        if pixels.shape != (h, w):
            raise ValueError(f'mask of {mask.label!r} has shape {pixels.shape}, its bbox is {w}x{h}')
        out.masks.append(ClassMaskMsg(
            label=str(mask.label), class_id=int(mask.class_id), score=float(mask.score), area=int(mask.area),
            bbox=RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h),
            mask=array_to_image(pixels.astype(np.uint8) * 255, 'mono8', header)))
        stats = points.get(int(mask.class_id))
        if stats is not None and stats.num_points > 0:
            out.masks[-1].num_points = int(stats.num_points)
            out.masks[-1].position = Point(x=float(stats.position[0]), y=float(stats.position[1]),
                                           z=float(stats.position[2]))
            out.masks[-1].size = Vector3(x=float(stats.size[0]), y=float(stats.size[1]), z=float(stats.size[2]))
    return out


def vocabulary_info(classes: Sequence[str], colors: Sequence[Sequence[int]], header: Header) -> VocabularyInfo:
    """``trident_ros/VocabularyInfo``: class k -> id k + 1, colour (R, G, B) packed as 0xRRGGBB."""
    return VocabularyInfo(header=header, classes=list(classes), class_ids=list(range(1, len(classes) + 1)),
                          colors=[(int(r) << 16) | (int(g) << 8) | int(b) for r, g, b in colors])


def label_info(classes: Sequence[str], threshold: float, header: Header) -> Any | None:
    """``vision_msgs/LabelInfo`` (0 = unlabeled, class k -> k + 1), or None without vision_msgs."""
    if LabelInfo is None:
        return None
    vision_class = vision_msgs.VisionClass
    class_map = [vision_class(class_id=0, class_name='unlabeled')]
    class_map += [vision_class(class_id=k, class_name=name) for k, name in enumerate(classes, start=1)]
    return LabelInfo(header=header, class_map=class_map, threshold=float(threshold))
