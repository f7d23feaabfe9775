"""Label the images of a recorded rosbag2 bag (sqlite3 or MCAP) into a new bag, without ROS.

Reads ``sensor_msgs/Image`` or ``sensor_msgs/CompressedImage`` messages of one topic with the
`rosbags` library, runs the pipeline on each selected frame and writes, at the input message's
bag time and with its header (stamp, frame_id), ``<prefix>/labels`` (mono8, mono16 past 255
classes), ``<prefix>/confidence`` (mono8, probability x 255), ``<prefix>/masks``
(``trident_ros/ClassMaskArray``, its fields read from the package's ``msg/*.msg`` at run time) and
optionally ``<prefix>/segmentation`` (rgb8 overlay) and overlay PNGs.

Progress survives interruptions: frames are written to closed "part" bags in ``<output>.parts/``
(a part is closed every ``checkpoint`` frames, on Ctrl-C/SIGTERM and on a read error of the input),
and the output bag is rebuilt from the closed parts at the end of every run, so what was written
stays valid. ``resume`` reads the closed parts (or a finished output) back and labels only the
frames not in them; a part left open by a killed process is discarded (at most ``checkpoint``
frames are redone). The parts are removed once every selected frame is in the output.

``rosbags`` is imported inside the functions: the core's other modules import without it. Messages
and image decoding: :mod:`.bag_messages`.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from tqdm import tqdm

from trident_ros.tools.bag_messages import (
    IMAGE_TYPES,
    MSG_PACKAGE,
    BagError,
    decode_image,
    image_message,
    make_typestore,
    new_message,
)

if TYPE_CHECKING:
    from rosbags.typesys.store import Typestore

    from trident_ros.labelling import Segmentation
    from trident_ros.pipeline import TridentPipeline
    from trident_ros.vocabulary import Vocabulary

logger = logging.getLogger('trident_ros.tools.bags')

CUSTOM_KEY = 'trident_ros.labelling'
BAG_VERSION = 8


@dataclass
class BagOptions:
    """What to label and what to write.

    Attributes:
        topic: the image topic (sensor_msgs/Image or sensor_msgs/CompressedImage).
        vocabulary: the vocabulary text (recorded in the output; a resume must use the same).
        prefix: namespace of the output topics (``<prefix>/labels`` ...).
        every: label every Nth message of the topic (counted from ``start``).
        start: seconds from the bag's first message; None: from the beginning.
        end: seconds from the bag's first message (exclusive); None: to the end.
        segmentation: also write ``<prefix>/segmentation`` (rgb8 overlay with legend).
        storage: ``sqlite3`` or ``mcap``; None: the input's.
    """

    topic: str
    vocabulary: str
    prefix: str = '/trident'
    every: int = 1
    start: float | None = None
    end: float | None = None
    segmentation: bool = False
    storage: str | None = None


@dataclass
class BagResult:
    """What a run did.

    Attributes:
        output: the output bag.
        selected: frames selected by topic, ``every``, ``start``/``end`` (read so far).
        labelled: frames labelled by this run.
        resumed: frames already in the output from an earlier run (not redone).
        refused: frames that could not be decoded (warned, skipped).
        seconds: time spent labelling (decode, pipeline, encode, write) this run.
        complete: every selected frame of the bag is in the output.
    """

    output: Path
    selected: int = 0
    labelled: int = 0
    resumed: int = 0
    refused: int = 0
    seconds: float = 0.0
    complete: bool = False


class Parts:
    """The part bags of one output: a part is opened at its first frame and closed every ``checkpoint`` frames."""

    def __init__(self, folder: Path, store: Typestore, storage: Any, settings: str, options: BagOptions,
                 checkpoint: int) -> None:
        self.folder, self.store, self.storage, self.settings = folder, store, storage, settings
        self.checkpoint = checkpoint
        self.names = ['labels', 'confidence', 'masks'] + (['segmentation'] if options.segmentation else [])
        self.prefix = options.prefix.rstrip('/')
        self.writer: Any = None
        self.connections: dict[str, Any] = {}
        self.frames = 0

    def _open(self) -> None:
        from rosbags.rosbag2 import Writer

        index = len(list(self.folder.glob('part_*')))
        self.writer = Writer(self.folder / f'part_{index:04d}', version=BAG_VERSION, storage_plugin=self.storage)
        self.writer.set_custom_data(CUSTOM_KEY, self.settings)
        self.writer.open()
        types = {'masks': f'{MSG_PACKAGE}/msg/ClassMaskArray'}
        self.connections = {name: self.writer.add_connection(f'{self.prefix}/{name}',
                                                             types.get(name, 'sensor_msgs/msg/Image'),
                                                             typestore=self.store) for name in self.names}
        self.frames = 0

    def close(self) -> None:
        """Close the open part (metadata written: it counts as done), if any."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write(self, timestamp: int, header: Any, rgb: np.ndarray, segmentation: Segmentation) -> None:
        """Write one frame's outputs at bag time ``timestamp`` with the input's ``header``."""
        if self.writer is None:
            self._open()
        store = self.store
        wide = len(segmentation.vocabulary) > 255
        messages = {
            'labels': image_message(store, segmentation.labels.astype(np.uint16 if wide else np.uint8),
                                    'mono16' if wide else 'mono8', header),
            'confidence': image_message(store, np.clip(np.rint(segmentation.confidence * 255.0), 0, 255)
                                        .astype(np.uint8), 'mono8', header),
            'masks': self._masks(header, segmentation),
        }
        if 'segmentation' in self.connections:
            messages['segmentation'] = image_message(store, segmentation.overlay(rgb), 'rgb8', header)
        for name, msg in messages.items():
            connection = self.connections[name]
            self.writer.write(connection, timestamp, store.serialize_cdr(msg, connection.msgtype))
        self.frames += 1
        if self.frames >= self.checkpoint:
            self.close()

    def _masks(self, header: Any, segmentation: Segmentation) -> Any:
        store = self.store
        masks = []
        for mask in sorted(segmentation.masks, key=lambda m: m.class_id):
            x, y, w, h = (int(v) for v in mask.bbox)
            bbox = new_message(store, 'sensor_msgs/msg/RegionOfInterest', x_offset=x, y_offset=y, width=w, height=h)
            masks.append(new_message(
                store, f'{MSG_PACKAGE}/msg/ClassMask', label=str(mask.label), class_id=int(mask.class_id),
                score=float(mask.score), area=int(mask.area), bbox=bbox,
                mask=image_message(store, np.asarray(mask.mask, dtype=np.uint8) * 255, 'mono8', header)))
        return new_message(store, f'{MSG_PACKAGE}/msg/ClassMaskArray', header=header,
                           vocabulary=list(segmentation.vocabulary), masks=masks)


def _write_pngs(folder: Path, timestamp: int, rgb: np.ndarray, segmentation: Segmentation) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f'{timestamp}_overlay.png'), cv2.cvtColor(segmentation.overlay(rgb), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / f'{timestamp}_labels.png'), segmentation.labels)


def bag_settings(options: BagOptions, source: Path) -> str:
    """The settings a resumed run must share with the earlier one (JSON, in the bag's custom_data)."""
    recorded = asdict(options)
    recorded.pop('storage')
    return json.dumps({'source': source.resolve().name, **recorded}, sort_keys=True)


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + '.parts')


def _closed_parts(parts: Path) -> list[Path]:
    return sorted(p for p in parts.glob('part_*') if (p / 'metadata.yaml').is_file())


def _complete_frames(part: Path) -> set[int]:
    """Bag times of the frames written on every output topic of a closed part.

    An interrupt can fall between a frame's messages: such a frame counts as not done.
    """
    from rosbags.rosbag2 import Reader

    per_topic: dict[str, set[int]] = {}
    with Reader(part) as reader:
        for connection, timestamp, _ in reader.messages():
            per_topic.setdefault(connection.topic, set()).add(timestamp)
    return set.intersection(*per_topic.values()) if per_topic else set()


def bag_info(bag: Path) -> dict:
    """``rosbag2_bagfile_information`` of a bag's metadata.yaml."""
    from ruamel.yaml import YAML

    return YAML(typ='safe').load((bag / 'metadata.yaml').read_text(encoding='utf-8'))['rosbag2_bagfile_information']


def _custom_of(bag: Path) -> str | None:
    return (bag_info(bag).get('custom_data') or {}).get(CUSTOM_KEY)


def _prepare_parts(output: Path, resume: bool, settings: str) -> Path:
    """The parts folder of ``output``, ready for this run; a finished output becomes part 0.

    Nothing is changed before the earlier run is known to be resumable with ``settings``.
    """
    parts = parts_dir(output)
    if not resume:
        for existing in (output, parts):
            if existing.exists():
                raise BagError(f'{existing} exists: pass --resume to continue that run, or choose another output')
    if output.exists() and not (output / 'metadata.yaml').is_file():
        raise BagError(f'{output} exists but is not a closed bag (no metadata.yaml)')
    closed = _closed_parts(parts)
    for bag in closed + ([output] if output.exists() else []):
        recorded = _custom_of(bag)
        if recorded != settings:
            raise BagError(f'cannot resume into {output}: {bag.name} was made with other settings ({recorded}); '
                           f'now: {settings}')
    parts.mkdir(parents=True, exist_ok=True)
    for stale in parts.glob('*'):
        if not (stale / 'metadata.yaml').is_file():  # left open by a killed run: its frames are redone
            logger.warning('discarding %s (not closed: the run writing it was killed)', stale)
            shutil.rmtree(stale)
    if output.exists() and not closed:
        output.rename(parts / 'part_0000')
    return parts


def merge_parts(parts: list[Path], output: Path, store: Typestore, storage: Any, settings: str) -> None:
    """Write the complete frames of every closed part into one new bag at ``output`` (then moved into place)."""
    from rosbags.rosbag2 import Reader, Writer

    staging = parts_dir(output) / 'merging' / output.name  # the storage file is named after the folder
    if staging.parent.exists():
        shutil.rmtree(staging.parent)
    writer = Writer(staging, version=BAG_VERSION, storage_plugin=storage)
    writer.set_custom_data(CUSTOM_KEY, settings)
    with writer:
        connections: dict[tuple[str, str], Any] = {}
        for part in parts:
            complete = _complete_frames(part)
            with Reader(part) as reader:
                for connection, timestamp, data in reader.messages():
                    if timestamp not in complete:
                        continue
                    key = (connection.topic, connection.msgtype)
                    if key not in connections:
                        connections[key] = writer.add_connection(connection.topic, connection.msgtype, typestore=store)
                    writer.write(connections[key], timestamp, data)
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    staging.parent.rmdir()


def label_bag(pipeline: TridentPipeline, vocabulary: Vocabulary, source: Path, output: Path, options: BagOptions,
              resume: bool = False, max_frames: int | None = None, png_dir: Path | None = None,
              checkpoint: int = 50) -> BagResult:
    """Label ``options.topic`` of the bag ``source`` into the bag ``output`` (see the module docstring).

    Args:
        pipeline: the loaded pipeline.
        vocabulary: ``pipeline.encode_vocabulary(options.vocabulary)``.
        source: a rosbag2 directory (sqlite3 or MCAP).
        output: the bag to write (a directory that must not exist unless ``resume``).
        options: topic, subsampling and outputs.
        resume: continue an earlier run into ``output``: frames already there are not redone.
        max_frames: stop after labelling this many frames (the output is closed as after Ctrl-C).
        png_dir: also write ``<bag time ns>_overlay.png`` and ``_labels.png`` per frame there.
        checkpoint: close the current part bag after this many frames (at most this many are
            redone after a kill).

    Returns:
        What was read, labelled and resumed; ``complete`` when the whole selection is in ``output``.

    Raises:
        BagError: unreadable or truncated input (after the frames read so far were written and the
            output closed), a missing or non-image topic, or an output that cannot be resumed.
        KeyboardInterrupt: after the output was closed with the frames done so far.
    """
    if checkpoint < 1:
        raise BagError(f'checkpoint {checkpoint}: must be >= 1')
    store = make_typestore()
    settings = bag_settings(options, source)
    reader, connections, storage = open_topic(source, options)
    result = BagResult(output=output)
    try:
        folder = _prepare_parts(output, resume, settings)
        done = set().union(*map(_complete_frames, _closed_parts(folder)))
        total = sum(c.msgcount for c in connections)
        frames = tqdm(total=-(-total // options.every) if options.start is None and options.end is None else None,
                      unit='frame', disable=None, desc=options.topic)
        parts = Parts(folder, store, storage, settings, options, checkpoint)
        try:
            for connection, timestamp, data in selected_messages(reader, connections, options):
                if timestamp in done:
                    result.selected += 1
                    result.resumed += 1
                    frames.update()
                    continue
                if max_frames is not None and result.labelled >= max_frames:
                    break
                result.selected += 1
                frames.update()
                began = time.monotonic()
                if label_frame(pipeline, vocabulary, reader, (connection, timestamp, data), parts, png_dir):
                    result.labelled += 1
                    result.seconds += time.monotonic() - began
                else:
                    result.refused += 1
            else:
                result.complete = True
        finally:
            frames.close()
            parts.close()
            closed = _closed_parts(folder)
            if closed:
                merge_parts(closed, output, store, storage, settings)
            if result.complete:
                shutil.rmtree(folder)
    finally:
        reader.close()
    return result


def open_topic(source: Path, options: BagOptions) -> tuple[Any, list, Any]:
    """The open reader of ``source``, the connections of ``options.topic`` and the output's storage plugin.

    Raises:
        BagError: a bad ``every``, an unreadable bag, a missing or non-image topic (the reader closed).
    """
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin

    if options.every < 1:
        raise BagError(f'--every {options.every}: must be >= 1')
    try:
        reader = AnyReader([source], default_typestore=make_typestore())
        reader.open()
    except Exception as error:  # rosbags raises assorted types for missing or broken bags
        raise BagError(f'cannot open the bag {source} (nothing of {options.topic} read, offset 0): '
                       f'{type(error).__name__}: {error}') from error
    try:
        connections = [c for c in reader.connections if c.topic == options.topic]
        if not connections:
            images = sorted({c.topic for c in reader.connections if c.msgtype in IMAGE_TYPES})
            raise BagError(f'{source} has no topic {options.topic!r}; its image topics: {", ".join(images) or "none"}')
        msgtypes = {c.msgtype for c in connections}
        if not msgtypes <= set(IMAGE_TYPES):
            raise BagError(f'{options.topic} carries {", ".join(sorted(msgtypes))}, not {" or ".join(IMAGE_TYPES)}')
        storage = StoragePlugin[(options.storage or bag_info(source)['storage_identifier']).upper()]
    except BaseException:
        reader.close()
        raise
    return reader, connections, storage


def selected_messages(reader: Any, connections: list, options: BagOptions,
                      window: tuple[int, int] | None = None) -> Iterator[tuple[Any, int, bytes]]:
    """The selected raw messages (``start``/``end``, then every ``every``-th) in bag-time order.

    Args:
        reader: the open reader of :func:`open_topic`.
        connections: the topic's connections.
        options: the selection (a read error raises a :class:`BagError` naming the topic and where).
        window: (first, last) bag times: every message in between, both included (a shard of an
            earlier selection, which the caller picks out); None: the selection of ``options``.
    """
    if window is not None:
        yield from _read(reader, connections, window[0], window[1] + 1, options)
        return
    begin = reader.start_time
    start = begin + int(options.start * 1e9) if options.start is not None else None
    stop = begin + int(options.end * 1e9) if options.end is not None else None
    for index, item in enumerate(_read(reader, connections, start, stop, options)):
        if index % options.every == 0:
            yield item


def label_frame(pipeline: TridentPipeline, vocabulary: Vocabulary, reader: Any, item: tuple[Any, int, bytes],
                parts: Parts, png_dir: Path | None) -> bool:
    """Label one raw message into ``parts`` (and PNGs); False when its image is refused (warned)."""
    connection, timestamp, data = item
    try:
        msg = reader.deserialize(data, connection.msgtype)
        rgb = decode_image(msg, connection.msgtype)
    except Exception as error:  # a corrupt message or image: warned, skipped, counted
        logger.warning('%s at bag time %d: image refused: %s', connection.topic, timestamp, error)
        return False
    segmentation = pipeline.label(pipeline.encode_image(rgb), vocabulary)
    header = new_message(parts.store, 'std_msgs/msg/Header', stamp=msg.header.stamp, frame_id=msg.header.frame_id)
    parts.write(timestamp, header, rgb, segmentation)
    if png_dir is not None:
        _write_pngs(png_dir, timestamp, rgb, segmentation)
    return True


def _read(reader: Any, connections: list, start: int | None, stop: int | None,
          options: BagOptions) -> Iterator[tuple[Any, int, bytes]]:
    """The topic's raw messages in bag-time order; a read error becomes a BagError naming where."""
    messages = reader.messages(connections=connections, start=start, stop=stop)
    count, last = 0, None
    while True:
        try:
            item = next(messages)
        except StopIteration:
            return
        except Exception as error:  # sqlite3/MCAP/rosbags errors of a corrupt or truncated bag
            where = (f'after message #{count} (bag time {last} ns, {(last - reader.start_time) / 1e9:.3f} s '
                     f'into the bag)' if last is not None else 'before its first message')
            raise BagError(f'{reader.paths[0]}: reading {options.topic} failed {where}: '
                           f'{type(error).__name__}: {error}; the frames labelled so far are in the output') from error
        count += 1
        last = item[1]
        yield item
