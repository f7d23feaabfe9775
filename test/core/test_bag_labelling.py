"""`trident-segment` on recorded rosbag2 bags.

Real bags written with rosbags (sqlite3 and MCAP, raw and compressed images), the command run as a
subprocess with tiny random-weight models, the output bag read back.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from trident_ros.tools.bag_messages import make_typestore, new_message

ROOT = Path(__file__).resolve().parents[2]
TOPIC = '/camera/color/image_raw'
VOCABULARY = 'road, car, sky'
CLASSES = ['road', 'car', 'sky']
SIZE = (160, 120)  # width, height: small frames keep the tiny pipeline at about a second per frame
T0 = 1_700_000_000 * 10**9


def input_stamps(count: int) -> list[tuple[int, int, int]]:
    """(bag time ns, header sec, header nanosec) of the frames written by :func:`make_bag`."""
    return [(T0 + i * 100_000_000, 1000 + i, 7 * i) for i in range(count)]


def make_bag(path: Path, storage: str, compressed: bool, count: int) -> Path:
    """A bag of ``count`` sample-scene frames (cycling the scenes) on :data:`TOPIC`, plus another topic."""
    store = get_typestore(Stores.LATEST)
    types = store.types
    msgtype = 'sensor_msgs/msg/CompressedImage' if compressed else 'sensor_msgs/msg/Image'
    scenes = [cv2.resize(cv2.imread(str(p)), SIZE) for p in sorted((ROOT / 'trident_ros' / 'data').glob('*.png'))]
    with Writer(path, version=8, storage_plugin=StoragePlugin[storage.upper()]) as writer:
        images = writer.add_connection(TOPIC, msgtype, typestore=store)
        other = writer.add_connection('/chatter', 'std_msgs/msg/String', typestore=store)
        for i, (timestamp, sec, nanosec) in enumerate(input_stamps(count)):
            header = types['std_msgs/msg/Header'](stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec),
                                                  frame_id='camera_color_optical_frame')
            bgr = scenes[i % len(scenes)]
            if compressed:
                data = np.frombuffer(cv2.imencode('.jpg', bgr)[1].tobytes(), dtype=np.uint8)
                msg = types[msgtype](header=header, format='bgr8; jpeg compressed bgr8', data=data)
            else:  # rows padded to a 16-byte multiple + 16: step must be honoured
                step = SIZE[0] * 3 + 16
                rows = np.zeros((SIZE[1], step), dtype=np.uint8)
                rows[:, :SIZE[0] * 3] = bgr.reshape(SIZE[1], -1)
                msg = types[msgtype](header=header, height=SIZE[1], width=SIZE[0], encoding='bgr8', is_bigendian=0,
                                     step=step, data=rows.reshape(-1))
            writer.write(images, timestamp, store.serialize_cdr(msg, msgtype))
            writer.write(other, timestamp + 1, store.serialize_cdr(types['std_msgs/msg/String'](data='x'),
                                                                   'std_msgs/msg/String'))
    return path


def segment(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'trident_ros.tools.segment',
                             *args, '-v', VOCABULARY, '--random-weights',
                           '--tiny'], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def read_output(path: Path) -> dict[str, list[tuple[int, object]]]:
    """The ``topic -> [(bag time, message)]`` of an output bag, decoded with the package's own types."""
    topics: dict[str, list[tuple[int, object]]] = {}
    with AnyReader([path], default_typestore=make_typestore()) as reader:
        for connection, timestamp, data in reader.messages():
            topics.setdefault(connection.topic, []).append((timestamp, reader.deserialize(data, connection.msgtype)))
    return topics


def pixels(image) -> np.ndarray:
    dtype = np.uint16 if image.encoding == 'mono16' else np.uint8
    return np.frombuffer(image.data.tobytes(), dtype=dtype).reshape(image.height, -1)[:, :image.width]


def check_frames(topics: dict, expected: list[tuple[int, int, int]], segmentation: bool) -> None:
    """Every expected frame once on each output, with the input's bag time and header; masks agree with labels."""
    names = {'/trident/labels', '/trident/confidence', '/trident/masks'} | ({'/trident/segmentation'} if segmentation
                                                                             else set())
    assert set(topics) == names
    for name in names:
        assert [t for t, _ in topics[name]] == [t for t, _, _ in expected], name
        for (_, msg), (_, sec, nanosec) in zip(topics[name], expected, strict=True):
            assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (sec, nanosec)
            assert msg.header.frame_id == 'camera_color_optical_frame'
    for (_, labels), (_, confidence), (_, masks) in zip(topics['/trident/labels'], topics['/trident/confidence'],
                                                        topics['/trident/masks'], strict=True):
        assert (labels.width, labels.height, labels.encoding) == (*SIZE, 'mono8')
        assert (confidence.width, confidence.height, confidence.encoding) == (*SIZE, 'mono8')
        label_image = pixels(labels)
        assert list(masks.vocabulary) == CLASSES
        present = sorted(int(v) for v in np.unique(label_image) if v)
        assert [m.class_id for m in masks.masks] == present
        for mask in masks.masks:
            assert mask.label == CLASSES[mask.class_id - 1]
            x, y, w, h = mask.bbox.x_offset, mask.bbox.y_offset, mask.bbox.width, mask.bbox.height
            assert (mask.mask.width, mask.mask.height) == (w, h)
            inside = label_image == mask.class_id
            assert mask.area == int(inside.sum())
            assert np.array_equal(pixels(mask.mask), inside[y:y + h, x:x + w].astype(np.uint8) * 255)
            assert not inside[:y].any() and not inside[y + h:].any() and not inside[:, :x].any() \
                and not inside[:, x + w:].any()
    if segmentation:
        for _, overlay in topics['/trident/segmentation']:
            assert (overlay.width, overlay.height, overlay.encoding) == (*SIZE, 'rgb8')


@pytest.mark.parametrize(('storage', 'compressed'), [('sqlite3', False), ('mcap', True)])
def test_bag_round_trip(tmp_path, storage, compressed):
    bag = make_bag(tmp_path / 'run1', storage, compressed, 4)
    result = segment(str(bag), '--topic', TOPIC, '-o', str(tmp_path / 'run1_labeled'), '--segmentation',
                     '--png', str(tmp_path / 'png'))
    assert result.returncode == 0, result.stderr
    out = tmp_path / 'run1_labeled'
    assert f'storage_identifier: {storage}' in (out / 'metadata.yaml').read_text()
    check_frames(read_output(out), input_stamps(4), segmentation=True)
    assert sorted(p.name for p in (tmp_path / 'png').iterdir()) == sorted(
        f'{t}_{kind}.png' for t, _, _ in input_stamps(4) for kind in ('overlay', 'labels'))
    assert not (tmp_path / 'run1_labeled.parts').exists()  # complete: no parts left
    assert re.search(r'4 frame\(s\) selected, 4 labelled \((\d+\.\d+) s/frame\)', result.stderr), result.stderr


def test_every_window_max_frames_and_resume(tmp_path):
    bag = make_bag(tmp_path / 'run1', 'sqlite3', False, 9)
    out = tmp_path / 'out'
    window = ['--every', '2', '--start', '0.1', '--end', '0.85']  # frames 1..8, every 2nd: 1, 3, 5, 7
    first = segment(str(bag), '--topic', TOPIC, '-o', str(out), *window, '--max-frames', '2')
    assert first.returncode == 0, first.stderr
    selected = [input_stamps(9)[i] for i in (1, 3, 5, 7)]
    check_frames(read_output(out), selected[:2], segmentation=False)  # a valid bag with what was done
    assert '--resume to continue' in first.stderr
    refused = segment(str(bag), '--topic', TOPIC, '-o', str(out), *window)
    assert refused.returncode == 1 and 'exists: pass --resume' in refused.stderr
    other = segment(str(bag), '--topic', TOPIC, '-o', str(out), '--every', '3', '--resume')
    assert other.returncode == 1 and 'other settings' in other.stderr  # a resume must keep the selection
    second = segment(str(bag), '--topic', TOPIC, '-o', str(out), *window, '--resume')
    assert second.returncode == 0, second.stderr
    assert '4 frame(s) selected, 2 labelled' in second.stderr and '2 already labelled' in second.stderr
    check_frames(read_output(out), selected, segmentation=False)
    assert not (tmp_path / 'out.parts').exists()


def test_resume_after_a_kill_redoes_only_the_unclosed_part(tmp_path):
    bag = make_bag(tmp_path / 'run1', 'mcap', False, 8)
    out, parts = tmp_path / 'out', tmp_path / 'out.parts'
    process = subprocess.Popen([sys.executable, '-m', 'trident_ros.tools.segment',
                             str(bag), '--topic', TOPIC, '-o', str(out),
                                '-v', VOCABULARY, '--random-weights', '--tiny', '--checkpoint', '1'],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while len(list(parts.glob('part_*/metadata.yaml'))) < 2 and time.monotonic() < deadline \
                and process.poll() is None:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # no chance to close anything
    finally:
        process.wait()
    closed = len(list(parts.glob('part_*/metadata.yaml')))
    assert 2 <= closed < 8, closed
    result = segment(str(bag), '--topic', TOPIC, '-o', str(out), '--checkpoint', '1', '--resume')
    assert result.returncode == 0, result.stderr
    assert f'8 frame(s) selected, {8 - closed} labelled' in result.stderr, result.stderr
    assert f'{closed} already labelled' in result.stderr
    check_frames(read_output(out), input_stamps(8), segmentation=False)


def test_corrupt_bag_names_topic_and_offset_and_keeps_the_frames_so_far(tmp_path):
    bag = make_bag(tmp_path / 'run1', 'sqlite3', False, 8)
    database = bag / 'run1.db3'
    with database.open('r+b') as file:  # garbage over the second half of the file's pages
        file.seek(database.stat().st_size * 6 // 10)
        file.write(b'\xff' * 5000)
    out = tmp_path / 'out'
    result = segment(str(bag), '--topic', TOPIC, '-o', str(out), '--checkpoint', '100')
    assert result.returncode == 1, result.stderr
    match = re.search(rf'reading {TOPIC} failed after message #(\d+) \(bag time (\d+) ns', result.stderr)
    assert match, result.stderr
    read = int(match.group(1))
    assert 0 < read < 8
    check_frames(read_output(out), input_stamps(8)[:read], segmentation=False)


def test_truncated_bag_is_a_clear_error(tmp_path):
    bag = make_bag(tmp_path / 'run1', 'mcap', True, 3)
    storage = bag / 'run1.mcap'
    os.truncate(storage, storage.stat().st_size // 2)
    result = segment(str(bag), '--topic', TOPIC, '-o', str(tmp_path / 'out'))
    assert result.returncode == 1
    assert f'cannot open the bag {bag} (nothing of {TOPIC} read, offset 0)' in result.stderr, result.stderr
    assert not (tmp_path / 'out').exists()


def test_a_bag_needs_its_topic_and_the_topic_must_exist(tmp_path):
    bag = make_bag(tmp_path / 'run1', 'sqlite3', True, 1)
    no_topic = segment(str(bag))
    assert no_topic.returncode == 2 and 'is a rosbag2 bag: pass --topic' in no_topic.stderr
    wrong = segment(str(bag), '--topic', '/nope', '-o', str(tmp_path / 'out'))
    assert wrong.returncode == 1 and f"no topic '/nope'; its image topics: {TOPIC}" in wrong.stderr
    not_images = segment(str(bag), '--topic', '/chatter', '-o', str(tmp_path / 'out'))
    assert not_images.returncode == 1 and 'carries std_msgs/msg/String' in not_images.stderr


def test_message_fields_come_from_the_msg_files_at_run_time(tmp_path):
    """A field added to ClassMask.msg is in the written messages (with its default) without code changes."""
    for name in ('ClassMask', 'ClassMaskArray', 'VocabularyInfo'):
        (tmp_path / f'{name}.msg').write_text((ROOT / 'msg' / f'{name}.msg').read_text())
    with (tmp_path / 'ClassMask.msg').open('a') as file:
        file.write('\ngeometry_msgs/Point extra_point\nfloat32[3] extra_size\nuint32 extra_count\n')
    store = make_typestore(tmp_path)
    mask = new_message(store, 'trident_ros/msg/ClassMask', label='door', class_id=2, area=5)
    array = new_message(store, 'trident_ros/msg/ClassMaskArray', vocabulary=['wall', 'door'], masks=[mask])
    back = store.deserialize_cdr(store.serialize_cdr(array, 'trident_ros/msg/ClassMaskArray'),
                                 'trident_ros/msg/ClassMaskArray')
    assert back.vocabulary == ['wall', 'door'] and back.masks[0].label == 'door' and back.masks[0].class_id == 2
    assert (back.masks[0].extra_point.x, back.masks[0].extra_count) == (0.0, 0)
    assert back.masks[0].extra_size.tolist() == [0.0, 0.0, 0.0]
    assert (back.masks[0].position.z, back.masks[0].num_points) == (0.0, 0)  # the 3D fields: no depth in a bag


def test_an_install_finds_the_msg_files_in_its_share_folder(tmp_path):
    """Outside the source tree (a non-symlink install) the .msg files come from <prefix>/share/trident_ros/msg."""
    package = tmp_path / 'site' / 'trident_ros'
    shutil.copytree(ROOT / 'trident_ros', package, ignore=shutil.ignore_patterns('__pycache__'))
    prefix = tmp_path / 'prefix'
    (prefix / 'share' / 'trident_ros').mkdir(parents=True)
    shutil.copytree(ROOT / 'msg', prefix / 'share' / 'trident_ros' / 'msg')
    env = {**os.environ, 'PYTHONPATH': str(package.parent), 'AMENT_PREFIX_PATH': str(prefix)}
    code = 'import trident_ros.tools.bag_messages as b; print(b.__file__); print(b.find_msg_dir())'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(package / 'tools' / 'bag_messages.py'),
                                     str(prefix / 'share' / 'trident_ros' / 'msg')]


def test_sigterm_closes_the_output_with_the_frames_done(tmp_path):
    bag = make_bag(tmp_path / 'run1', 'sqlite3', True, 30)
    out, png = tmp_path / 'out', tmp_path / 'png'
    process = subprocess.Popen([sys.executable, '-m', 'trident_ros.tools.segment',
                             str(bag), '--topic', TOPIC, '-o', str(out),
                                '-v', VOCABULARY, '--random-weights', '--tiny', '--png', str(png)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while len(list(png.glob('*_labels.png'))) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.terminate()  # SIGTERM, as a job scheduler or `timeout` sends
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert f'interrupted: the frames labelled so far are in {out}' in stderr
    done = len(list(png.glob('*_labels.png')))  # written after the frame's messages
    topics = read_output(out)
    written = len(topics['/trident/labels'])
    assert 2 <= done <= written <= done + 1 < 30, (done, written)
    check_frames(topics, input_stamps(30)[:written], segmentation=False)
