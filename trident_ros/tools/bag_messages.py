"""rosbags messages of this package without ROS: the typestore with our ``msg/*.msg``, message builders, images.

``rosbags`` is imported inside the functions: the core's other modules import without it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trident_ros.image_decoding import MAX_PIXELS, compressed_to_rgb, image_to_rgb

if TYPE_CHECKING:
    from rosbags.typesys.store import Typestore

IMAGE_TYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
MSG_PACKAGE = 'trident_ros'
MSG_FILES = ('ClassMask', 'ClassMaskArray', 'VocabularyInfo')


class BagError(RuntimeError):
    """A bag cannot be read or written as asked; the message says which bag, topic and where."""


def find_msg_dir() -> Path:
    """The package's ``msg/`` folder: the source tree, else ``<prefix>/share/trident_ros/msg`` of an install.

    Raises:
        BagError: none found.
    """
    candidates = [Path(__file__).resolve().parents[2] / 'msg']
    prefixes = [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]
    candidates += [Path(prefix) / 'share' / MSG_PACKAGE / 'msg' for prefix in [*prefixes, sys.prefix]]
    for folder in candidates:
        if all((folder / f'{name}.msg').is_file() for name in MSG_FILES):
            return folder
    raise BagError('the trident_ros message definitions (msg/ClassMaskArray.msg) were not found in: '
                   + ', '.join(map(str, candidates)))


def make_typestore(msg_dir: Path | None = None) -> Typestore:
    """The typestore of the latest ROS 2 LTS plus this package's messages.

    Args:
        msg_dir: the folder of ``ClassMask.msg`` ...; None: :func:`find_msg_dir`.
    """
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.LATEST)
    folder = msg_dir or find_msg_dir()
    types: dict = {}
    for name in MSG_FILES:
        types.update(get_types_from_msg((folder / f'{name}.msg').read_text(encoding='utf-8'),
                                        f'{MSG_PACKAGE}/msg/{name}'))
    store.register(types)
    return store


def new_message(store: Typestore, msgtype: str, **values: Any) -> Any:
    """A ``msgtype`` message: ``values`` for the fields given, zero/empty/default for every other one.

    Fields are taken from the typestore, so fields added to a ``.msg`` file get their defaults.
    """
    from rosbags.typesys.base import Nodetype

    _, fields = store.fielddefs[msgtype]
    arguments = {}
    for name, (kind, detail) in fields:
        if name in values:
            arguments[name] = values[name]
        elif kind == Nodetype.NAME:
            arguments[name] = new_message(store, detail)
        elif kind == Nodetype.BASE:
            arguments[name] = '' if detail[0] == 'string' else (False if detail[0] == 'bool' else 0)
        else:  # ARRAY (fixed size) or SEQUENCE
            (inner_kind, inner), size = detail
            length = size if kind == Nodetype.ARRAY else 0
            if inner_kind == Nodetype.NAME:
                arguments[name] = [new_message(store, inner) for _ in range(length)]
            elif inner[0] in ('string', 'bool'):
                arguments[name] = [('' if inner[0] == 'string' else False)] * length
            else:
                arguments[name] = np.zeros(length, dtype=np.uint8 if inner[0] in ('byte', 'char') else inner[0])
    return store.types[msgtype](**arguments)


def image_message(store: Typestore, array: np.ndarray, encoding: str, header: Any) -> Any:
    """An ``(H, W)`` or ``(H, W, C)`` array as a rosbags ``sensor_msgs/Image`` (little-endian data)."""
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder('<'), copy=False))
    return new_message(store, 'sensor_msgs/msg/Image', header=header, height=array.shape[0], width=array.shape[1],
                       encoding=encoding, is_bigendian=0, step=array.strides[0],
                       data=np.frombuffer(array.tobytes(), dtype=np.uint8))


def decode_image(msg: Any, msgtype: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a rosbags Image/CompressedImage, decoded as the node decodes (:mod:`.image_decoding`).

    Raises:
        ImageConversionError: (a ``ValueError``) unsupported encoding, inconsistent size, over ``max_pixels``
            (a compressed image by its header, before decoding), or undecodable data.
    """
    if msgtype.endswith('CompressedImage'):
        return compressed_to_rgb(msg, max_pixels)
    return image_to_rgb(msg, max_pixels)
