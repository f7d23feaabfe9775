"""ROS messages <-> NumPy arrays for the trident node (no node, no pipeline here).

Input images are decoded by ``cv_bridge`` where it is installed AND works (a ROS 2 install), else
by ``rosbags-image`` (pure Python, duck-types rclpy messages). Both are only handed messages that
were checked here first: a known encoding, a positive size within ``max_pixels``, ``step`` at
least one row of pixels, and ``len(data) == height * step``. Row padding (``step`` larger than a
row) is removed before decoding, because rosbags-image ignores ``step``.

Accepted ``sensor_msgs/Image`` encodings (:data:`SUPPORTED_ENCODINGS`):

* ``rgb8``, ``bgr8``, ``rgba8``, ``bgra8`` (alpha dropped), ``mono8`` (grey replicated to RGB);
* ``rgb16``, ``bgr16``, ``rgba16``, ``bgra16``, ``mono16``: scaled linearly to 8 bits
  (0..65535 -> 0..255, no auto-contrast, so a depth image in millimetres looks black);
  big-endian data (``is_bigendian``) is byte-swapped.

Refused with :class:`ImageConversionError`: every other encoding (Bayer, YUV, ``16SC1``,
``32FC1`` and other float/depth images, made-up names). rosbags-image could convert Bayer and
YUV 4:2:2 as well, but that path is not verified here, so the node does not claim it.
Images larger than ``max_pixels`` are refused, never downscaled: outputs must keep the input's
pixel grid (``~/labels`` pixel (u, v) is camera pixel (u, v)).

``sensor_msgs/CompressedImage``: whatever OpenCV's ``imdecode`` reads (JPEG, PNG, ...; the content
decides, the ``format`` field is not trusted), decoded to 8-bit; grey and alpha handled as above.
The pixel size is read from the header first (Pillow, no decoding), so that a small file that
would decode to gigabytes (a "decompression bomb") is refused before any pixel is allocated.
"""
from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
from geometry_msgs.msg import Point, Vector3
from sensor_msgs.msg import CompressedImage, Image, RegionOfInterest
from std_msgs.msg import Header

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

# encoding -> (channels, bytes per channel); the encodings the node accepts (see module docstring)
SUPPORTED_ENCODINGS: dict[str, tuple[int, int]] = {
    'rgb8': (3, 1), 'bgr8': (3, 1), 'rgba8': (4, 1), 'bgra8': (4, 1), 'mono8': (1, 1),
    'rgb16': (3, 2), 'bgr16': (3, 2), 'rgba16': (4, 2), 'bgra16': (4, 2), 'mono16': (1, 2),
}
_GRAY_OR_COLOUR_TO_RGB = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}


class ImageConversionError(ValueError):
    """An image message cannot be used; the message says why (for a warning, never a crash).

    ``reason`` names the kind of problem (``encoding``, ``size``, ``too_large``, ``step``,
    ``length``, ``decode``), so that a node can throttle its warnings per kind.
    """

    def __init__(self, message: str, reason: str = 'decode') -> None:
        super().__init__(message)
        self.reason = reason


Decoder = Callable[[str, int, int, bool, np.ndarray], np.ndarray]
"""``(encoding, height, width, is_bigendian, data (height * row bytes,) uint8) -> (H, W, 3) uint8 RGB``."""


def _cv_bridge_decoder() -> Decoder | None:
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


def _rosbags_decoder() -> Decoder:
    from rosbags.image import image_to_cvimage

    def decode(encoding: str, height: int, width: int, bigendian: bool, data: np.ndarray) -> np.ndarray:
        msg = SimpleNamespace(height=height, width=width, encoding=encoding, is_bigendian=bigendian,
                              step=len(data) // height, data=data)
        return image_to_cvimage(msg, 'rgb8')

    return decode


def _select_decoder() -> tuple[str, Decoder]:
    bridge = _cv_bridge_decoder()
    return ('cv_bridge', bridge) if bridge is not None else ('rosbags-image', _rosbags_decoder())


IMAGE_BACKEND, _DECODE = _select_decoder()
"""Which library decodes ``sensor_msgs/Image`` in this process, and its decoder."""


def check_size(height: int, width: int, max_pixels: int) -> None:
    """Raise :class:`ImageConversionError` for an empty image or one over ``max_pixels``."""
    if height <= 0 or width <= 0:
        raise ImageConversionError(f'empty image ({width}x{height})', 'size')
    if height * width > max_pixels:
        raise ImageConversionError(
            f'{width}x{height} = {height * width} pixels exceeds max_input_pixels={max_pixels}; '
            'refused (outputs keep the input resolution): scale the image down before sending it', 'too_large')


def image_to_rgb(msg: Image, max_pixels: int) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` into an ``(H, W, 3)`` uint8 RGB array (a new array).

    Raises:
        ImageConversionError: unsupported encoding, bad size, ``step`` or ``data`` length.
    """
    encoding = msg.encoding.strip().lower()
    if encoding not in SUPPORTED_ENCODINGS:
        raise ImageConversionError(
            f'unsupported encoding {msg.encoding[:32]!r}; supported: {", ".join(SUPPORTED_ENCODINGS)}', 'encoding')
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    check_size(height, width, max_pixels)
    channels, depth = SUPPORTED_ENCODINGS[encoding]
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise ImageConversionError(
            f'step {step} is smaller than one row of {width} {encoding} pixels ({row_bytes} bytes)', 'step')
    if len(msg.data) != height * step:
        raise ImageConversionError(f'data has {len(msg.data)} bytes, height*step is {height * step}', 'length')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if step != row_bytes:  # drop row padding: rosbags-image reads rows as contiguous
        data = np.ascontiguousarray(data.reshape(height, step)[:, :row_bytes])
    try:
        rgb = _DECODE(encoding, height, width, bool(msg.is_bigendian), data)
    except Exception as error:  # the libraries raise assorted types; report, never propagate
        raise ImageConversionError(f'{encoding} image could not be decoded: {error}') from error
    return _as_rgb8(rgb, f'{encoding} image')


def compressed_to_rgb(msg: CompressedImage, max_pixels: int) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG, ...) into ``(H, W, 3)`` uint8 RGB.

    Raises:
        ImageConversionError: empty or undecodable data, or a decoded size over ``max_pixels``.
    """
    if len(msg.data) == 0:
        raise ImageConversionError('compressed image has no data', 'size')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    header_size = compressed_size(data)
    if header_size is not None:
        check_size(*header_size, max_pixels)
    # OpenCV's imdecode, as rosbags-image and cv_bridge use; its result is checked here because
    # rosbags-image only asserts it (an AssertionError, or None under python -O).
    try:
        decoded = cv2.imdecode(data, cv2.IMREAD_ANYCOLOR)
    except cv2.error as error:  # e.g. over OpenCV's own pixel limit
        raise ImageConversionError(f'compressed image could not be decoded: {str(error).strip()[:200]}') from error
    if decoded is None:
        raise ImageConversionError(
            f'compressed image ({len(msg.data)} bytes, format {msg.format[:32]!r}) could not be decoded')
    check_size(decoded.shape[0], decoded.shape[1], max_pixels)
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    if channels not in _GRAY_OR_COLOUR_TO_RGB:
        raise ImageConversionError(f'compressed image decoded to {channels} channels')
    return _as_rgb8(cv2.cvtColor(decoded, _GRAY_OR_COLOUR_TO_RGB[channels]), 'compressed image')


def compressed_size(data: np.ndarray) -> tuple[int, int] | None:
    """``(height, width)`` from a compressed image's header (Pillow reads the header only), or
    None when Pillow does not know the format (OpenCV may still decode it).
    """
    from PIL import Image as PilImage

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', PilImage.DecompressionBombWarning)
            with PilImage.open(io.BytesIO(data.tobytes())) as image:
                width, height = image.size
    except PilImage.DecompressionBombError as error:  # more than twice Pillow's own pixel limit
        raise ImageConversionError(f'compressed image is too large: {error}', 'too_large') from error
    except Exception:  # unknown or broken header: let OpenCV decide
        return None
    return height, width


def _as_rgb8(image: np.ndarray, what: str) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageConversionError(f'{what} decoded to {image.shape} {image.dtype}, not (H, W, 3) uint8')
    return np.ascontiguousarray(image)


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
