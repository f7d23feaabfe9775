"""One image decoder for the node and for bags (``image_decoding``), exercised here on rosbags messages, the bag
path's ``decode_image`` and rclpy-shaped stand-ins (no ROS): step, 16 bit, refusals, and decompression bombs
refused by their header on the bag path too. The node's side (rclpy messages, cv_bridge) is test/ros/test_conversions.
"""
from __future__ import annotations

import array
import struct
import time
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from trident_ros import image_decoding
from trident_ros.image_decoding import ImageConversionError
from trident_ros.tools.bag_messages import decode_image, new_message

STORE = get_typestore(Stores.LATEST)
IMAGE, COMPRESSED = 'sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage'


def bag_image(encoding: str, width: int, height: int, step: int, data: np.ndarray):
    return new_message(STORE, IMAGE, encoding=encoding, width=width, height=height, step=step,
                       data=np.ascontiguousarray(data).view(np.uint8).reshape(-1))


def bag_compressed(data: bytes | np.ndarray, fmt: str = 'png'):
    return new_message(STORE, COMPRESSED, format=fmt, data=np.frombuffer(bytes(data), np.uint8).copy())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk (8-bit RGB) followed by IEND: a header without pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IEND', b''))


def test_bag_images_honour_step_scale_16_bit_and_refuse_bad_images():
    bgr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 3 * 3 + 7), dtype=np.uint8)
    padded[:, :9] = bgr.reshape(2, 9)
    assert np.array_equal(decode_image(bag_image('bgr8', 3, 2, 16, padded), IMAGE), bgr[..., ::-1])
    mono16 = np.array([[0, 65535], [32768, 1000]], dtype='<u2')
    assert decode_image(bag_image('mono16', 2, 2, 4, mono16), IMAGE)[..., 0].tolist() == [[0, 255], [127, 3]]
    with pytest.raises(ImageConversionError, match="unsupported encoding '32FC1'"):
        decode_image(bag_image('32FC1', 1, 1, 4, np.zeros(1, np.float32)), IMAGE)
    with pytest.raises(ImageConversionError, match='step 2'):
        decode_image(bag_image('rgb8', 2, 1, 2, np.zeros(2, np.uint8)), IMAGE)
    jpeg = cv2.imencode('.jpg', np.full((8, 8, 3), 200, np.uint8))[1]
    decoded = decode_image(bag_compressed(jpeg, 'jpeg'), COMPRESSED)
    assert decoded.shape == (8, 8, 3) and abs(int(decoded.mean()) - 200) <= 2
    with pytest.raises(ImageConversionError, match='could not be decoded'):
        decode_image(bag_compressed(jpeg[:20], 'jpeg'), COMPRESSED)
    with pytest.raises(ImageConversionError, match='no data'):
        decode_image(bag_compressed(b'', 'jpeg'), COMPRESSED)


def test_a_huge_compressed_image_is_refused_by_its_header_on_the_bag_path():
    """A few bytes declaring 8000x8000 (over the default limit) or 40000x40000 (over Pillow's own): refused as
    'too_large' without decoding (decoding would fail with reason 'decode': the header alone decided).
    """
    for width, max_pixels in ((8000, image_decoding.MAX_PIXELS), (40_000, 10**12)):
        began = time.monotonic()
        with pytest.raises(ImageConversionError) as refused:
            decode_image(bag_compressed(png_header_only(width, width)), COMPRESSED, max_pixels)
        assert refused.value.reason == 'too_large', refused.value
        assert time.monotonic() - began < 1.0
    small = cv2.imencode('.png', np.zeros((30, 40, 3), np.uint8))[1]
    with pytest.raises(ImageConversionError, match='exceeds max_input_pixels=1000') as refused:
        decode_image(bag_compressed(small), COMPRESSED, max_pixels=1000)
    assert refused.value.reason == 'too_large'
    assert decode_image(bag_compressed(small), COMPRESSED, max_pixels=1200).shape == (30, 40, 3)


def test_a_raw_image_over_the_limit_is_refused_before_its_data_is_read():
    msg = bag_image('rgb8', 5000, 4000, 15000, np.zeros(1, np.uint8))  # 20 Mpixel declared, 1 byte of data
    with pytest.raises(ImageConversionError, match='20000000 pixels exceeds') as refused:
        decode_image(msg, IMAGE)
    assert refused.value.reason == 'too_large'


def test_both_message_libraries_decode_alike():
    """The same messages in rclpy's shape (``data`` an ``array.array('B')`` or bytes) decodes to the same pixels."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rows = np.zeros((5, 7 * 4 + 3), np.uint8)
    rows[:, :28] = rgba.reshape(5, 28)
    rosbags_msg = bag_image('rgba8', 7, 5, 31, rows)
    rclpy_like = SimpleNamespace(encoding='rgba8', width=7, height=5, step=31, is_bigendian=0,
                                 data=array.array('B', rows.tobytes()))
    expected = rgba[..., :3]
    assert np.array_equal(decode_image(rosbags_msg, IMAGE), expected)
    assert np.array_equal(image_decoding.image_to_rgb(rclpy_like), expected)
    png = cv2.imencode('.png', rgba[..., :3][..., ::-1])[1].tobytes()
    assert np.array_equal(image_decoding.compressed_to_rgb(SimpleNamespace(format='png', data=png)), expected)
    assert np.array_equal(decode_image(bag_compressed(png), COMPRESSED), expected)
