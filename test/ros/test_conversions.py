"""trident_ros.ros.conversions: ROS image messages <-> arrays, checked against naive formulas."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import ros_helpers  # noqa: E402  (fails with a clear message outside the project environment)
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from trident_ros.image_decoding import ImageConversionError, compressed_size, compressed_to_rgb  # noqa: E402
from trident_ros.labelling import ClassMask  # noqa: E402
from trident_ros.ros import conversions  # noqa: E402

RNG = np.random.default_rng(0)
BIG = 10_000_000
NATIVE_BIG = sys.byteorder == 'big'


def make_image(array: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = NATIVE_BIG) -> Image:
    """A hand-built message: rows of ``array`` (in the given byte order) plus ``pad`` bytes each."""
    if array.itemsize > 1:
        array = array.astype(array.dtype.newbyteorder('>' if bigendian else '<'))
    rows = array.reshape(array.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((rows.shape[0], pad), 7, np.uint8)], axis=1)
    return Image(header=Header(frame_id='cam'), height=array.shape[0], width=array.shape[1], encoding=encoding,
                 is_bigendian=int(bigendian), step=padded.shape[1], data=padded.tobytes())


def rgb_image(height: int = 5, width: int = 7) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize('encoding, to_message', [
    ('rgb8', lambda rgb: rgb),
    ('bgr8', lambda rgb: rgb[..., ::-1]),
    ('rgba8', lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)])),
    ('bgra8', lambda rgb: np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 9, np.uint8)])),
])
@pytest.mark.parametrize('pad', [0, 3])
def test_8bit_colour_encodings_decode_to_rgb(encoding, to_message, pad):
    rgb = rgb_image()
    decoded = conversions.image_to_rgb(make_image(np.ascontiguousarray(to_message(rgb)), encoding, pad), BIG)
    assert decoded.dtype == np.uint8 and decoded.shape == rgb.shape
    np.testing.assert_array_equal(decoded, rgb)


def test_mono8_is_replicated_to_grey_rgb():
    grey = RNG.integers(0, 256, (4, 6), dtype=np.uint8)
    decoded = conversions.image_to_rgb(make_image(grey, 'mono8', pad=2), BIG)
    np.testing.assert_array_equal(decoded, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize('bigendian', [False, True])
def test_16bit_is_scaled_linearly_to_8bit(bigendian):
    grey = RNG.integers(0, 65536, (3, 4), dtype=np.uint16)
    colour = RNG.integers(0, 65536, (3, 4, 3), dtype=np.uint16)
    expected_grey = (grey.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)  # naive: linear, truncated
    expected_colour = (colour.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    mono = conversions.image_to_rgb(make_image(grey, 'mono16', bigendian=bigendian), BIG)
    bgr = conversions.image_to_rgb(make_image(colour[..., ::-1].copy(), 'bgr16', bigendian=bigendian), BIG)
    assert np.abs(mono.astype(int) - expected_grey[..., None].astype(int)).max() <= 1
    assert np.abs(bgr.astype(int) - expected_colour.astype(int)).max() <= 1


@pytest.mark.parametrize('encoding', ['bayer_rggb8', '32FC1', '16SC1', 'yuv422', 'nv12', 'made_up', ''])
def test_unsupported_encodings_are_refused(encoding):
    msg = Image(height=2, width=2, encoding=encoding, step=8, data=bytes(16))
    with pytest.raises(ImageConversionError, match='unsupported encoding'):
        conversions.image_to_rgb(msg, BIG)


@pytest.mark.parametrize('change, message', [
    (dict(step=5), 'step 5 is smaller'),
    (dict(data=bytes(6 * 3 - 1)), 'data has 17 bytes'),
    (dict(data=bytes(6 * 3 + 1)), 'data has 19 bytes'),
    (dict(height=0, width=0, step=0, data=b''), 'empty image'),
    (dict(height=3, width=2, step=6, data=bytes(18)), 'exceeds max_input_pixels=5'),
])
def test_malformed_images_are_refused(change, message):
    fields = dict(height=2, width=3, encoding='rgb8', step=9, data=bytes(18))
    fields.update(change)
    if 'step' in change and 'data' not in change:
        fields['data'] = bytes(fields['height'] * fields['step'])
    with pytest.raises(ImageConversionError, match=message):
        conversions.image_to_rgb(Image(**fields), max_pixels=5 if 'exceeds' in message else BIG)


def test_extreme_shapes_decode():
    for height, width in [(1, 1), (1, 10_000)]:
        rgb = rgb_image(height, width)
        np.testing.assert_array_equal(conversions.image_to_rgb(make_image(rgb, 'rgb8'), BIG), rgb)


def compressed(data: bytes, fmt: str = 'jpeg') -> CompressedImage:
    return CompressedImage(format=fmt, data=data)


def test_png_decodes_exactly_whatever_format_says():
    rgb = rgb_image(6, 8)
    png = cv2.imencode('.png', rgb[..., ::-1])[1].tobytes()
    np.testing.assert_array_equal(compressed_to_rgb(compressed(png, 'png'), BIG), rgb)
    np.testing.assert_array_equal(compressed_to_rgb(compressed(png, 'jpeg'), BIG), rgb)


def test_grey_png_and_jpeg_decode_to_rgb():
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    png = cv2.imencode('.png', grey)[1].tobytes()
    np.testing.assert_array_equal(compressed_to_rgb(compressed(png), BIG), np.dstack([grey] * 3))
    smooth = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    jpeg = cv2.imencode('.jpg', smooth[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    assert np.abs(compressed_to_rgb(compressed(jpeg), BIG).astype(int) - smooth).max() <= 3


@pytest.mark.parametrize('data, message', [
    (b'', 'no data'),
    (bytes(RNG.integers(0, 256, 500, dtype=np.uint8)), 'could not be decoded'),
    (cv2.imencode('.jpg', np.zeros((32, 32, 3), np.uint8))[1].tobytes()[:40], 'could not be decoded'),
])
def test_bad_compressed_images_are_refused(data, message):
    with pytest.raises(ImageConversionError, match=message):
        compressed_to_rgb(compressed(data), BIG)


def test_compressed_size_limit_applies_after_decoding():
    png = cv2.imencode('.png', np.zeros((10, 10, 3), np.uint8))[1].tobytes()
    with pytest.raises(ImageConversionError, match='exceeds max_input_pixels=99'):
        compressed_to_rgb(compressed(png), 99)


@pytest.mark.parametrize('fields, reason', [
    (dict(encoding='bayer_rggb8'), 'encoding'),
    (dict(step=5), 'step'),
    (dict(data=bytes(17)), 'length'),
    (dict(height=0, width=0, step=0, data=b''), 'size'),
    (dict(height=8000, width=8000, step=24000, data=b''), 'too_large'),  # size checked before the data
])
def test_refusals_name_their_kind(fields, reason):
    msg = Image(**{**dict(height=2, width=3, encoding='rgb8', step=9, data=bytes(18)), **fields})
    with pytest.raises(ImageConversionError) as refused:
        conversions.image_to_rgb(msg, 16_777_216)
    assert refused.value.reason == reason


def test_extreme_aspect_ratios_decode_both_ways():
    for height, width in [(10_000, 1), (1, 10_000)]:
        rgb = rgb_image(height, width)
        np.testing.assert_array_equal(conversions.image_to_rgb(make_image(rgb, 'rgb8', pad=1), BIG), rgb)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk (8-bit RGB) followed by IEND: a header without pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)) + \
        chunk(b'IEND', b'')


def test_compressed_size_is_read_from_the_header_before_decoding():
    assert compressed_size(np.frombuffer(png_header_only(123, 45), np.uint8)) == (45, 123)
    jpeg = cv2.imencode('.jpg', np.zeros((30, 50, 3), np.uint8))[1].tobytes()
    assert compressed_size(np.frombuffer(jpeg, np.uint8)) == (30, 50)
    assert compressed_size(np.frombuffer(bytes(range(200)), np.uint8)) is None
    # a "decompression bomb": 8000x8000 declared, no pixel data; decoding would fail with another
    # reason, so 'too_large' shows that the header alone decided
    cases = [(png_header_only(8000, 8000), 16_777_216),  # over max_input_pixels
             (png_header_only(40_000, 40_000), 10**12)]  # over Pillow's own decompression-bomb limit
    for data, max_pixels in cases:
        with pytest.raises(ImageConversionError) as refused:
            compressed_to_rgb(compressed(data), max_pixels)
        assert refused.value.reason == 'too_large'


def test_truncated_png_and_jpeg_are_refused():
    image = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for extension in ('.png', '.jpg'):
        data = cv2.imencode(extension, image)[1].tobytes()
        with pytest.raises(ImageConversionError, match='could not be decoded'):
            compressed_to_rgb(compressed(data[:len(data) // 2]), BIG)


def decode_mono(msg: Image, dtype: type) -> np.ndarray:
    """Naive reading of a mono image message (rows of ``step`` bytes, declared byte order)."""
    order = '>' if msg.is_bigendian else '<'
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    return rows[:, :msg.width * np.dtype(dtype).itemsize].copy().view(np.dtype(dtype).newbyteorder(order))


def test_label_images_are_mono8_up_to_255_classes_then_mono16():
    header = Header(frame_id='cam')
    labels = RNG.integers(0, 256, (4, 5)).astype(np.uint8)
    msg = conversions.labels_to_image(labels, 255, header)
    assert (msg.encoding, msg.height, msg.width, msg.step, msg.header.frame_id) == ('mono8', 4, 5, 5, 'cam')
    np.testing.assert_array_equal(decode_mono(msg, np.uint8), labels)
    big = RNG.integers(0, 1001, (4, 5)).astype(np.uint16)
    msg = conversions.labels_to_image(big, 1000, header)
    assert (msg.encoding, msg.step) == ('mono16', 10)
    np.testing.assert_array_equal(decode_mono(msg, np.uint16), big)


def test_confidence_is_rounded_to_0_255():
    confidence = np.array([[0.0, 0.5, 1.0], [0.002, 0.998, 1.5]], np.float32)
    msg = conversions.confidence_to_image(confidence, Header())
    np.testing.assert_array_equal(decode_mono(msg, np.uint8), [[0, 128, 255], [1, 254, 255]])


def test_class_masks_message():
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 2:5] = 2
    labels[4, 7] = 1
    masks = [ClassMask('chair', 2, 0.7, 6, (2, 1, 3, 2), labels[1:3, 2:5] == 2),
             ClassMask('door', 1, 0.4, 1, (7, 4, 1, 1), labels[4:5, 7:8] == 1)]
    msg = conversions.class_masks_to_msg(masks, ['door', 'chair'], Header(frame_id='cam'))
    assert list(msg.vocabulary) == ['door', 'chair'] and msg.header.frame_id == 'cam'
    assert [(m.label, m.class_id, m.area) for m in msg.masks] == [('door', 1, 1), ('chair', 2, 6)]
    chair = msg.masks[1]
    assert (chair.bbox.x_offset, chair.bbox.y_offset, chair.bbox.width, chair.bbox.height) == (2, 1, 3, 2)
    assert chair.score == pytest.approx(0.7)
    assert (chair.mask.encoding, chair.mask.width, chair.mask.height) == ('mono8', 3, 2)
    np.testing.assert_array_equal(decode_mono(chair.mask, np.uint8), np.full((2, 3), 255))
    with pytest.raises(ValueError, match='bbox'):
        conversions.class_masks_to_msg([ClassMask('x', 1, 0.5, 1, (0, 0, 2, 2), np.ones((1, 1), bool))],
                                       ['x'], Header())


def test_vocabulary_info_packs_colours():
    msg = conversions.vocabulary_info(['sofa; couch', 'door'], [(255, 0, 1), (1, 2, 3)], Header())
    assert list(msg.classes) == ['sofa; couch', 'door']
    assert list(msg.class_ids) == [1, 2]
    assert list(msg.colors) == [0xFF0001, 0x010203]


def test_label_info_only_with_vision_msgs():
    info = conversions.label_info(['door'], 0.2, Header())
    if conversions.LabelInfo is None:
        assert info is None
    else:  # pragma: no cover - vision_msgs installed
        assert [(c.class_id, c.class_name) for c in info.class_map] == [(0, 'unlabeled'), (1, 'door')]


def test_without_vision_msgs_the_node_is_told_why_label_info_and_detections_3d_are_off():
    """vision_msgs made unimportable in a subprocess: one text says which outputs are off and why."""
    code = textwrap.dedent('''
        import sys
        sys.modules['vision_msgs'] = None  # import vision_msgs raises ImportError
        from std_msgs.msg import Header
        from trident_ros.ros import conversions, depth_io
        assert conversions.LabelInfo is None and conversions.label_info(['door'], 0.2, Header()) is None
        assert depth_io.vision_msgs is None
        print(conversions.VISION_MSGS_MISSING)
    ''')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = result.stdout.strip()
    assert text.startswith('vision_msgs cannot be imported (') and 'import of vision_msgs halted' in text
    assert '~/label_info' in text and '~/detections_3d' in text and 'not published' in text
    assert conversions.VISION_MSGS_MISSING == ''  # here it imports: the node says nothing
    package = ros_helpers.ROOT / 'trident_ros'
    importers = [str(path.relative_to(package)) for path in package.rglob('*.py')
                 if 'vision_msgs import' in path.read_text(encoding='utf-8')]
    assert importers == ['ros/conversions.py']  # the one place


def test_array_to_image_round_trip():
    rgb = rgb_image(3, 4)
    msg = conversions.array_to_image(rgb, 'rgb8', Header(frame_id='f'))
    assert (msg.height, msg.width, msg.step, msg.is_bigendian) == (3, 4, 12, 0)
    np.testing.assert_array_equal(np.frombuffer(bytes(msg.data), np.uint8).reshape(3, 4, 3), rgb)
    assert conversions.IMAGE_BACKEND in ('cv_bridge', 'rosbags-image')
