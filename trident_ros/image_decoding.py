"""Image messages' bytes -> ``(H, W, 3)`` uint8 RGB arrays, the same for the node (rclpy) and for bags (rosbags).

The messages are duck-typed: a ``sensor_msgs/Image`` has ``height``, ``width``, ``encoding``,
``is_bigendian``, ``step`` and ``data``; a ``sensor_msgs/CompressedImage`` has ``format`` and ``data``;
``data`` is anything with the buffer protocol (``bytes``, rclpy's ``array.array``, rosbags' NumPy array).

Raw images are checked here first -- a known encoding, a positive size within ``max_pixels``, ``step``
at least one row of pixels, ``len(data) == height * step`` -- and their row padding is removed; then
a :data:`RawDecoder` decodes them: rosbags-image (:func:`decode_with_rosbags`, pure Python) unless
the caller passes another (the node passes cv_bridge's where it works).

Accepted ``sensor_msgs/Image`` encodings (:data:`SUPPORTED_ENCODINGS`):

* ``rgb8``, ``bgr8``, ``rgba8``, ``bgra8`` (alpha dropped), ``mono8`` (grey replicated to RGB);
* ``rgb16``, ``bgr16``, ``rgba16``, ``bgra16``, ``mono16``: scaled linearly to 8 bits
  (0..65535 -> 0..255, no auto-contrast, so a depth image in millimetres looks black);
  big-endian data (``is_bigendian``) is byte-swapped.

Refused with :class:`ImageConversionError`: every other encoding (Bayer, YUV, ``16SC1``,
``32FC1`` and other float/depth images, made-up names). rosbags-image could convert Bayer and
YUV 4:2:2 as well, but that path is not verified here, so it is not claimed.
Images larger than ``max_pixels`` are refused, never downscaled: outputs must keep the input's
pixel grid (``~/labels`` pixel (u, v) is camera pixel (u, v)).

``sensor_msgs/CompressedImage``: whatever OpenCV's ``imdecode`` reads (JPEG, PNG, ...; the content
decides, the ``format`` field is not trusted), decoded to 8-bit; grey and alpha handled as above.
The pixel size is read from the header first (Pillow, no decoding), so that a small file that
would decode to gigabytes (a "decompression bomb") is refused before any pixel is allocated.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np

MAX_PIXELS = 16_777_216
"""The default pixel limit (4096 x 4096), the node's ``max_input_pixels`` default."""
SUPPORTED_ENCODINGS: dict[str, tuple[int, int]] = {
    'rgb8': (3, 1), 'bgr8': (3, 1), 'rgba8': (4, 1), 'bgra8': (4, 1), 'mono8': (1, 1),
    'rgb16': (3, 2), 'bgr16': (3, 2), 'rgba16': (4, 2), 'bgra16': (4, 2), 'mono16': (1, 2),
}
"""encoding -> (channels, bytes per channel) of the raw encodings accepted (see the module docstring)."""
_GRAY_OR_COLOUR_TO_RGB = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}

RawDecoder = Callable[[str, int, int, bool, np.ndarray], np.ndarray]
"""``(encoding, height, width, is_bigendian, data (height * row bytes,) uint8) -> (H, W, 3) uint8 RGB``."""


class ImageConversionError(ValueError):
    """An image message cannot be used; the message says why (for a warning, never a crash).

    ``reason`` names the kind of problem (``encoding``, ``size``, ``too_large``, ``step``,
    ``length``, ``decode``), so that a node can throttle its warnings per kind.
    """

    def __init__(self, message: str, reason: str = 'decode') -> None:
        super().__init__(message)
        self.reason = reason


def decode_with_rosbags(encoding: str, height: int, width: int, bigendian: bool, data: np.ndarray) -> np.ndarray:
    """A :data:`RawDecoder` by rosbags-image's ``image_to_cvimage(msg, 'rgb8')`` (it reads rows as contiguous)."""
    from rosbags.image import image_to_cvimage

    msg = SimpleNamespace(height=height, width=width, encoding=encoding, is_bigendian=bigendian,
                          step=len(data) // height, data=data)
    return image_to_cvimage(msg, 'rgb8')


def check_size(height: int, width: int, max_pixels: int) -> None:
    """Raise :class:`ImageConversionError` for an empty image or one over ``max_pixels``."""
    if height <= 0 or width <= 0:
        raise ImageConversionError(f'empty image ({width}x{height})', 'size')
    if height * width > max_pixels:
        raise ImageConversionError(
            f'{width}x{height} = {height * width} pixels exceeds max_input_pixels={max_pixels}; '
            'refused (outputs keep the input resolution): scale the image down before sending it', 'too_large')


def image_to_rgb(msg: Any, max_pixels: int = MAX_PIXELS, decode: RawDecoder = decode_with_rosbags) -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` (either library's) into an ``(H, W, 3)`` uint8 RGB array (a new array).

    Args:
        msg: the message (fields as the module docstring says).
        max_pixels: larger images are refused.
        decode: decodes the checked, unpadded rows.

    Raises:
        ImageConversionError: unsupported encoding, bad size, ``step`` or ``data`` length, or undecodable.
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
        rgb = decode(encoding, height, width, bool(msg.is_bigendian), data)
    except Exception as error:  # the libraries raise assorted types; report, never propagate
        raise ImageConversionError(f'{encoding} image could not be decoded: {error}') from error
    return _as_rgb8(rgb, f'{encoding} image')


def compressed_to_rgb(msg: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (either library's; JPEG, PNG, ...) into ``(H, W, 3)`` uint8 RGB.

    Raises:
        ImageConversionError: empty or undecodable data, or a size over ``max_pixels`` (read from the
            header before decoding where Pillow knows the format, else after decoding).
    """
    if len(msg.data) == 0:
        raise ImageConversionError('compressed image has no data', 'size')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    header_size = compressed_size(data)
    if header_size is not None:
        check_size(*header_size, max_pixels)
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

    Raises:
        ImageConversionError: (``too_large``) over Pillow's own decompression-bomb limit.
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
