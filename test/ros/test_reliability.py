"""Issue 7: bad input, overload and faults never take the trident node down, and nothing is lost.

One node process (the installed ``trident_node`` executable, tiny random-weight models, own
ROS_DOMAIN_ID) serves the module. Tests run in file order; each leaves the node active with
VOCABULARY and its default parameters, except the last, which stops it with SIGINT in the middle
of a frame. The node is started with ``TRIDENT_TEST_FAULT_FRAME_ID`` (a documented test hook,
docs/reliability.md) so that one test can make a frame fail inside the worker as CUDA running out
of memory would.
"""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import torch
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus
from lifecycle_msgs.msg import Transition

# ros_helpers: it checks the ROS 2 environment with a clear message
from ros_helpers import (
    BEST_EFFORT,
    LATCHED,
    RELIABLE,
    ROOT,
    RosProcess,
    TestNode,
    executable,
    ros_env,
    running,
    wait_until,
)
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String
from test_node import (
    NODE,
    OUTPUT_TYPES,
    ROOM,
    VOCABULARY,
    VOCABULARY_NAMES,
    decode,
    diagnostics_after,
    same_stamp,
    send_until_outputs,
    set_vocabulary_by_topic,
)

from trident_ros.config import TridentConfig
from trident_ros.models.weight_files import WeightsError, load_state_dict
from trident_ros.pipeline import TridentPipeline
from trident_ros.ros.frame_io import FAULT_FRAME_ID_ENV

pytest_plugins = ('node_fixtures',)  # domain, env, client, outputs, cameras (this module's own), active (on trident)
FAULT_FRAME_ID = 'inject_fault'
ROS_PEER = str(Path(__file__).with_name('ros_peer.py'))  # another ROS process: an echo or a latched publisher
SMALL = np.ascontiguousarray(ROOM[::8, ::8])  # 80x60
_stamps = iter(range(500_000, 600_000))


# ------------------------------------------------------------------ fixtures
def start_node(env: dict[str, str], log: Path, *arguments: str) -> RosProcess:
    return RosProcess([executable('trident_node'), '--ros-args', '-p', 'models.random_weights:=true',
                       '-p', 'models.model_scale:=tiny', '-p', f'vocabulary:={VOCABULARY}', *arguments], env, log)


@pytest.fixture(scope='module')
def trident(env, client, outputs, cameras, tmp_path_factory):
    """The node, configured and active, with the fault-injection hook armed."""
    # HF_HUB_OFFLINE: the weights test's missing files are reported at once (no hub probe)
    process = start_node({**env, FAULT_FRAME_ID_ENV: FAULT_FRAME_ID, 'HF_HUB_OFFLINE': '1'},
                         tmp_path_factory.mktemp('node') / 'node.log')
    with running(client, process, NODE):
        yield process


# ------------------------------------------------------------------ helpers
def models(**values) -> dict:
    """Values of the ``models.`` section by their dotted parameter names."""
    return {f'models.{name}': value for name, value in values.items()}


def raw(array: np.ndarray, encoding: str = 'rgb8', frame_id: str = 'test_camera', bigendian: bool = False,
        stamp: Time | None = None) -> Image:
    """``array`` as an Image message, its bytes as they are in memory (byte order: ``bigendian``)."""
    array = np.ascontiguousarray(array)
    header = Header(stamp=stamp or Time(sec=next(_stamps)), frame_id=frame_id)
    return Image(header=header, height=array.shape[0], width=array.shape[1], encoding=encoding,
                 is_bigendian=int(bigendian), step=array.strides[0], data=array.tobytes())


def counters(outputs, since: float | None = None, extra=lambda values, level, message: True, timeout: float = 20.0):
    """The node's diagnostics values (ints where numeric), level and message, published after ``since``
    (default: now, so that a baseline counts every frame sent before the call).
    """
    values, level, message = diagnostics_after(outputs, time.monotonic() if since is None else since,
                                               timeout=timeout, extra=extra)
    return {k: int(v) if v.isdigit() else v for k, v in values.items()}, level, message


def rss_mb(process: RosProcess) -> float:
    """The resident memory of the node (the executable's own process), in MiB."""
    return psutil.Process(process.popen.pid).memory_info().rss / 2**20


def stream(publisher, make, period: float) -> tuple[threading.Event, threading.Thread]:
    """Publish ``make()`` every ``period`` seconds in a thread until the returned event is set."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            publisher.publish(make())
            time.sleep(period)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return stop, thread


def labels_of(msg: Image) -> np.ndarray:
    dtype = {'mono8': np.uint8, 'mono16': np.uint16}[msg.encoding]
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    return rows[:, :msg.width * np.dtype(dtype).itemsize].copy().view(dtype)


def vocabulary_taken(outputs, names: list[str], since: float, timeout: float = 30.0) -> bool:
    return outputs['vocabulary_info'].wait_for(lambda m: list(m.classes) == names, timeout, after=since) is not None


# ------------------------------------------------------------------ the core: extreme aspect ratios
@pytest.mark.parametrize('method', ['trident', 'proxy', 'maskclip'])
def test_extreme_aspect_ratios_segment_in_the_core(method):
    """Sides that round to 0 pixels in a resize (1x10000 at the short-side rescale, 2x3000 in
    SAM's longest-side transform and mask prompt) used to raise; every method now segments them.
    """
    pipeline = TridentPipeline(TridentConfig.from_mapping({
        'models.model_scale': 'tiny', 'models.random_weights': True, 'models.device': 'cpu', 'method': method,
        'refinement.coarse_thresh': 0.0, 'refinement.minimal_area': 1, 'labelling.prob_thd': 0.0}))
    vocabulary = pipeline.encode_vocabulary('wall, floor, door')
    rng = np.random.default_rng(1)
    for height, width in [(1, 10_000), (10_000, 1), (2, 3000), (3000, 2), (1, 1)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        seg = pipeline.segment(image, vocabulary)
        assert seg.labels.shape == (height, width) and seg.confidence.shape == (height, width)
        assert np.isfinite(seg.confidence).all() and set(np.unique(seg.labels)) <= {1, 2, 3}
        if pipeline.models.sam is not None:  # SAM sees at least one whole patch on the short side
            resized, _ = pipeline.models.sam.resize(image)
            assert min(resized.shape[:2]) >= pipeline.models.sam.patch_size


# ------------------------------------------------------------------ images
def test_malformed_and_unsupported_images_are_refused_and_counted(active, client, outputs, cameras):
    start, _, _ = counters(outputs)
    bad = []
    for encoding in ('bayer_rggb8', '32FC1', 'yuv422', 'made_up'):
        msg = raw(SMALL)
        msg.encoding = encoding
        bad.append(msg)
    short_step, short_data, long_data = raw(SMALL), raw(SMALL), raw(SMALL)
    short_step.step = 10
    short_data.data = bytes(short_data.data)[:-5]
    long_data.data = bytes(long_data.data) + b'xx'
    bad += [short_step, short_data, long_data,
            Image(header=Header(frame_id='test_camera'), height=0, width=0, encoding='rgb8', step=0, data=b'')]
    for msg in bad:
        cameras['reliable'].publish(msg)
        time.sleep(0.25)  # the node keeps only the newest frame: let it take each one
    values, level, message = counters(outputs, time.monotonic(),
                                      extra=lambda v, *_: int(v['frames_rejected']) >= start['frames_rejected'] + 8)
    assert values['frames_rejected'] == start['frames_rejected'] + len(bad)
    assert values['frames_processed'] == start['frames_processed'] and values['frames_failed'] == start['frames_failed']
    assert level == DiagnosticStatus.WARN and message.startswith('image refused')
    log = active.output()
    for reason in ("unsupported encoding 'bayer_rggb8'", 'step 10 is smaller than one row of 80 rgb8 pixels',
                   'data has 14395 bytes, height*step is 14400', 'empty image (0x0)'):
        assert reason in log, reason  # one warning per kind of problem (throttled per kind)
    # over max_input_pixels: refused, never downscaled
    assert client.set_parameters(NODE, {'max_input_pixels': 1000})[0].successful
    try:
        cameras['reliable'].publish(raw(SMALL))  # 80x60 = 4800 pixels
        counters(outputs, time.monotonic(), extra=lambda v, level, message: 'exceeds max_input_pixels=1000' in message)
    finally:
        assert client.set_parameters(NODE, {'max_input_pixels': 16_777_216})[0].successful
    send_until_outputs(cameras['reliable'], raw(SMALL), outputs, ('labels',))
    assert active.alive() and 'Traceback' not in active.output()


def test_tiny_and_extreme_aspect_images_are_segmented(active, outputs, cameras):
    for height, width in [(1, 1), (1, 10_000), (10_000, 1)]:
        msg = raw(np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8))
        found = send_until_outputs(cameras['reliable'], msg, outputs, ('labels', 'confidence', 'segmentation'))
        for out in found.values():
            assert (out.height, out.width) == (height, width)
    assert 'frame skipped' not in active.output()


def test_an_8000x8000_image_never_reaches_the_pipeline(active, client, outputs, cameras):
    """64 MB (8000x8000 mono8) is over the DDS profile's 32 MiB message limit: the transport drops
    it before the node sees it, or, with a transport that delivers it, max_input_pixels refuses it.
    """
    start, _, _ = counters(outputs)
    cameras['reliable'].publish(raw(np.zeros((8000, 8000), np.uint8), 'mono8'))
    time.sleep(3.0)
    values, _, _ = counters(outputs, time.monotonic())
    received = values['frames_received'] - start['frames_received']
    assert values['frames_rejected'] - start['frames_rejected'] == received  # 0 (dropped by DDS) or refused
    assert values['frames_processed'] == start['frames_processed'] and values['frames_failed'] == start['frames_failed']
    send_until_outputs(cameras['reliable'], raw(SMALL), outputs, ('labels',))


def test_big_endian_16_bit_and_padded_rows_decode_exactly(active, client, outputs, cameras):
    """With every pixel unlabeled the overlay is the decoded input: compare it with a naive decoding."""
    assert client.set_parameters(NODE, {'labelling.logit_scale': 0.01, 'labelling.prob_thd': 0.95},
                                 atomically=True)[0].successful
    try:
        rng = np.random.default_rng(7)
        colour = rng.integers(0, 65536, (60, 80, 3), dtype=np.uint16)
        grey = rng.integers(0, 65536, (60, 80), dtype=np.uint16)
        padded = np.concatenate([SMALL.reshape(60, -1), np.full((60, 6), 99, np.uint8)], axis=1)
        cases = [
            (raw(colour.astype('>u2'), 'rgb16', bigendian=True), colour.astype(np.int64) * 255 // 65535),
            (raw(grey.astype('>u2'), 'mono16', bigendian=True),
             np.repeat((grey.astype(np.int64) * 255 // 65535)[..., None], 3, axis=2)),
            (raw(padded, 'rgb8'), SMALL),
        ]
        cases[2][0].width = 80  # 80 pixels per row, then 6 bytes of padding (step 246)
        for msg, expected in cases:
            found = send_until_outputs(cameras['reliable'], msg, outputs, ('segmentation', 'labels'))
            assert not decode(found['labels']).any()
            overlay = decode(found['segmentation']).astype(int)
            assert np.abs(overlay - expected.astype(int)).max() <= 1, msg.encoding  # 16 -> 8 bit rounding
    finally:
        assert client.set_parameters(NODE, {'labelling.logit_scale': 40.0, 'labelling.prob_thd': 0.2},
                                     atomically=True)[0].successful


def test_past_and_future_stamps_and_frame_id_changes_pass_through(active, client, outputs, cameras):
    past = raw(SMALL, frame_id='camera_a', stamp=Time(sec=0, nanosec=0))
    future = raw(SMALL, frame_id='camera_b', stamp=Time(sec=2**31 - 1, nanosec=999_999_999))
    for msg in (past, future):
        found = send_until_outputs(cameras['reliable'], msg, outputs)
        for out in found.values():
            assert out.header.frame_id == msg.header.frame_id and same_stamp(out, msg.header)
    # a vocabulary change relabels the LAST frame, with its own header
    since = time.monotonic()
    set_vocabulary_by_topic(client, outputs, 'door, window', ['door', 'window'])
    relabelled = outputs['masks'].wait_for(lambda m: list(m.vocabulary) == ['door', 'window'], 20, after=since)
    assert relabelled.header.frame_id == 'camera_b' and same_stamp(relabelled, future.header)


def test_compressed_images_bad_and_good(active, client, outputs, cameras):
    assert client.set_parameters(NODE, {'image_transport': 'compressed'})[0].successful
    try:
        assert wait_until(lambda: client.node.count_subscribers('/image/compressed') > 0, 10)
        bgr = cv2.cvtColor(ROOM[::4, ::4], cv2.COLOR_RGB2BGR)
        jpeg = cv2.imencode('.jpg', bgr)[1].tobytes()
        png = cv2.imencode('.png', bgr)[1].tobytes()
        huge_png = cv2.imencode('.png', np.zeros((8000, 8000), np.uint8))[1].tobytes()  # 69 KB
        bad = [b'', jpeg[:len(jpeg) // 2], png[:len(png) // 2], np.random.default_rng(3).bytes(5000), huge_png]
        start, _, _ = counters(outputs)
        for data in bad:
            cameras['compressed'].publish(CompressedImage(header=Header(frame_id='jpeg_camera'), format='jpeg',
                                                          data=data))
            time.sleep(0.3)
        values, _, message = counters(outputs, time.monotonic(),
                                      extra=lambda v, *_: int(v['frames_rejected']) >= start['frames_rejected'] + 5)
        assert values['frames_rejected'] == start['frames_rejected'] + len(bad)
        assert values['frames_processed'] == start['frames_processed']
        assert '8000x8000 = 64000000 pixels exceeds max_input_pixels' in message  # from the header, not decoded
        log = active.output()
        assert 'compressed image has no data' in log and 'could not be decoded' in log
        for data, fmt in ((png, 'jpeg'), (jpeg, 'jpeg')):  # PNG declared as JPEG: the content decides
            msg = CompressedImage(header=Header(stamp=Time(sec=next(_stamps)), frame_id='jpeg_camera'),
                                  format=fmt, data=data)
            found = send_until_outputs(cameras['compressed'], msg, outputs, ('labels',))
            assert (found['labels'].width, found['labels'].height) == (160, 120)
    finally:
        assert client.set_parameters(NODE, {'image_transport': 'raw'})[0].successful


# ------------------------------------------------------------------ vocabulary
def test_vocabulary_edge_cases_over_the_topic(active, client, outputs, cameras, tmp_path):
    send_until_outputs(cameras['reliable'], raw(SMALL), outputs, ('masks',))
    publisher = client.publisher(String, f'{NODE}/vocabulary', RELIABLE)
    assert wait_until(lambda: publisher.get_subscription_count() > 0, 10)
    start, _, _ = counters(outputs)
    info_count = len(outputs['vocabulary_info'].snapshot())
    refused = ['', ', ; ,', ' \t\n  ', 'x' * 100_000, ', '.join(f'c{i}' for i in range(1001))]
    for text in refused:
        publisher.publish(String(data=text))
    values, level, _ = counters(outputs, time.monotonic(),
                                extra=lambda v, *_: int(v['vocabularies_refused']) >= start['vocabularies_refused'] + 5)
    assert values['vocabularies_refused'] == start['vocabularies_refused'] + len(refused)
    assert values['vocabulary_size'] == len(VOCABULARY_NAMES)
    assert client.get_parameters(NODE, ['vocabulary']) == {'vocabulary': VOCABULARY}
    assert len(outputs['vocabulary_info'].snapshot()) == info_count  # nothing new announced
    log = active.output()
    for reason in ('vocabulary is empty', 'more than the limit of 65536', 'more than the limit of 1000'):
        assert 'refused, keeping the last good one: vocabulary' in log and reason in log, reason
    last = raw(SMALL)
    send_until_outputs(cameras['reliable'], last, outputs, ('masks',))  # the last good vocabulary still labels
    assert list(outputs['masks'].snapshot()[-1].vocabulary) == VOCABULARY_NAMES

    marker = tmp_path / 'pwned'
    accepted = [
        ('chair, table, chair', ['chair', 'table'], "duplicate name 'chair' in class 3 dropped"),
        ('sofa; couch, couch; settee, bed', ['sofa; couch', 'settee', 'bed'], "duplicate name 'couch' in class 2"),
        ('🚪 Tür, 椅子, café, Straße', ['🚪 Tür', '椅子', 'café', 'Straße'], None),
        ('ta\tble, do\x1bor\x07, lamp\r\nshade', ['ta ble', 'door', 'lamp shade'], None),
        ('\x1b[1;31mred\x1b[0m, sky', ['red', 'sky'], 'terminal escape sequence(s) (e.g. colour codes) removed'),
        ('a' + 'qzx' * 80, ['a' + 'qzx' * 80], 'is too long: its prompts were truncated to the text context'),
        (f'$(touch {marker}), `touch {marker}`; {marker} | sh, ../../../..{marker}',
         [f'$(touch {marker})', f'`touch {marker}`; {marker} | sh', f'../../../..{marker}'], None),
    ]
    for text, names, warning in accepted:
        since = time.monotonic()
        publisher.publish(String(data=text))
        assert vocabulary_taken(outputs, names, since), (text, active.output()[-2000:])
        if warning:
            assert wait_until(lambda warning=warning: warning in active.output(), 5), warning
    assert not marker.exists()  # vocabulary text never reaches a shell or a path
    # 1,000 classes: accepted; labels switch to mono16 past 255 classes
    names = [f'class {i}' for i in range(1000)]
    since = time.monotonic()
    publisher.publish(String(data=', '.join(names)))
    assert vocabulary_taken(outputs, names, since, timeout=120), active.output()[-2000:]
    relabelled = outputs['labels'].wait_for(lambda m: m.encoding == 'mono16', 30, after=since)
    assert relabelled is not None and same_stamp(relabelled, last.header)
    assert labels_of(relabelled).max() <= 1000
    client.node.destroy_publisher(publisher)


# ------------------------------------------------------------------ parameters and weights
def test_invalid_runtime_parameters_are_refused_and_the_old_values_stay(active, client, outputs, cameras):
    refused = [('labelling.prob_thd', -0.5), ('refinement.coarse_thresh', -0.1),
               ('refinement.sam_iou_thresh', float('inf')), ('labelling.logit_scale', -1.0), ('trident.gamma', 0.0),
               ('trident.beta', -1.0),
               ('refinement.minimal_area', 0), ('windows.slide_crop', 128),  # crop < stride 224
               ('windows.slide_stride', 400), ('windows.clip_slide_stride', 448), ('models.device', 'tpu'),
               ('models.device', 'cuda:x'),
               ('max_input_pixels', -1), ('labelling.prob_thd', 'high'), ('refinement.refine', 'yes')]
    if not torch.cuda.is_available():
        refused.append(('models.device', 'cuda'))  # no such device here: refused now, not at the next configure
    for name, value in refused:
        before = client.get_parameters(NODE, [name])
        result = client.set_parameters(NODE, {name: value})[0]
        assert not result.successful and result.reason, (name, value)
        assert client.get_parameters(NODE, [name]) == before, name
    # atomically: one bad value refuses the whole change
    result = client.set_parameters(NODE, {'labelling.prob_thd': 0.5, 'windows.slide_stride': 999}, atomically=True)[0]
    assert not result.successful and client.get_parameters(NODE, ['labelling.prob_thd']) == {'labelling.prob_thd': 0.2}
    assert 'parameter change refused: models.device=' in active.output()
    assert client.set_parameters(NODE, {'labelling.logit_scale': 41})[0].successful  # an int for a float is fine
    assert client.get_parameters(NODE, ['labelling.logit_scale']) == {'labelling.logit_scale': 41.0}
    assert client.set_parameters(NODE, {'labelling.logit_scale': 40.0})[0].successful
    send_until_outputs(cameras['reliable'], raw(SMALL), outputs, ('labels',))  # still segmenting, old values


class PickledPayload:
    """Unpickling it would create ``path``: what a malicious checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), 'w')


def test_weight_file_problems_fail_configure_naming_the_file(active, client, tmp_path):
    """Missing, truncated, corrupt, wrong-model and malicious checkpoints: configure fails with one
    error line naming the file; the process stays up and configures again afterwards.
    """
    empty, official = tmp_path / 'empty', tmp_path / 'official'
    empty.mkdir()
    official.mkdir()
    truncated = official / 'sam_vit_b_01ec64.pth'
    truncated.write_bytes(os.urandom(1000))
    corrupt, wrong, evil, marker = (tmp_path / 'my_sam.pth', tmp_path / 'dino_as_sam.pth', tmp_path / 'evil.pth',
                                    tmp_path / 'unpickled')
    corrupt.write_bytes(os.urandom(4096))
    torch.save({'blocks.0.attn.qkv.weight': torch.zeros(3, 3)}, wrong)
    torch.save(PickledPayload(marker), evil)
    gone = tmp_path / 'deleted.pth'
    gone.write_bytes(b'x')
    other_weights = dict(dino_checkpoint=str(tmp_path / 'dino.pth'), clip_pretrained=str(tmp_path / 'clip.safetensors'))
    for name in ('dino.pth', 'clip.safetensors'):
        (tmp_path / name).write_bytes(b'never read: SAM is loaded first')
    cases = [
        (dict(weights_dir=str(empty)), f'SAM vit_b weights sam_vit_b_01ec64.pth are not at {empty}'),
        (dict(weights_dir=str(official)), f'{truncated} is corrupt or truncated: SHA-256'),
        (dict(sam_checkpoint=str(corrupt), **other_weights), f'cannot read weights file {corrupt}'),
        (dict(sam_checkpoint=str(wrong), **other_weights), f'{wrong} is not a SAM vit_b checkpoint'),
        (dict(sam_checkpoint=str(evil), **other_weights), f'cannot read weights file {evil}'),
        (dict(sam_checkpoint=str(gone), **other_weights), f'models.sam_checkpoint {gone} does not exist'),
    ]
    default_files = models(weights_dir='', sam_checkpoint='', dino_checkpoint='', clip_pretrained='openai')
    assert client.change_state(NODE, Transition.TRANSITION_DEACTIVATE)
    assert client.change_state(NODE, Transition.TRANSITION_CLEANUP)
    try:
        for values, expected in cases:
            real_weights = models(random_weights=False, model_scale='full', download=False, **values)
            assert all(r.successful for r in client.set_parameters(NODE, real_weights, atomically=True)), values
            if values.get('sam_checkpoint') == str(gone):
                gone.unlink()  # set while it existed, gone by configure time: weights.py says so
            assert not client.change_state(NODE, Transition.TRANSITION_CONFIGURE)
            assert active.wait_for_output(f'configure failed: {expected}', 20), (expected, active.output()[-3000:])
            assert client.lifecycle_state(NODE) == 'unconfigured' and active.alive()
            # a gone file blocks no other change
            assert client.set_parameters(NODE, {'labelling.prob_thd': 0.25})[0].successful
            restored = {'labelling.prob_thd': 0.2, **default_files}
            assert client.set_parameters(NODE, restored, atomically=True)[0].successful
        assert f'path    {empty / "sam_vit_b_01ec64.pth"}' in active.output()  # the missing file's listed path
        assert not marker.exists()  # torch.load(weights_only=True) never ran the payload
        assert 'Traceback' not in active.output()
    finally:
        random_weights = {**models(random_weights=True, model_scale='tiny', download=True), **default_files}
        assert client.set_parameters(NODE, random_weights, atomically=True)[0].successful
        assert client.change_state(NODE, Transition.TRANSITION_CONFIGURE), active.output()[-3000:]
        assert client.change_state(NODE, Transition.TRANSITION_ACTIVATE)


# ------------------------------------------------------------------ overload and faults
def test_a_100_hz_burst_of_640x480_keeps_the_newest_frame_and_memory_flat(active, client, outputs, cameras):
    send_until_outputs(cameras['best_effort'], raw(ROOM), outputs, ('labels',))  # warm: 640x480 seen before
    rss_before = rss_mb(active)
    start, _, _ = counters(outputs)
    frames = [raw(ROOM) for _ in range(300)]  # 3 s at 100 Hz, 900 KiB each
    began = time.monotonic()
    for index, msg in enumerate(frames):
        cameras['best_effort'].publish(msg)
        time.sleep(max(0.0, began + (index + 1) / 100 - time.monotonic()))
    rate = len(frames) / (time.monotonic() - began)
    newest = outputs['labels'].wait_for(lambda m: same_stamp(m, frames[-1].header), 30)
    assert newest is not None  # the newest frame is never dropped
    rss_after = rss_mb(active)
    values, _, _ = counters(outputs, time.monotonic())
    received, processed, dropped = (values[k] - start[k] for k in ('frames_received', 'frames_processed',
                                                                    'frames_dropped'))
    print(f'\nburst: {len(frames)} frames sent at {rate:.0f} Hz, received {received}, processed {processed}, '
          f'dropped (counted) {dropped}; RSS {rss_before:.0f} -> {rss_after:.0f} MB')
    # + 1: the snapshot before the burst may have been taken with a frame received but not yet processed
    assert dropped >= 1 and processed < received and processed + dropped <= received + 1, values
    assert rss_after - rss_before < 50.0


def test_a_failing_frame_is_skipped_with_an_error_and_the_next_frame_works(active, client, outputs, cameras):
    start, _, _ = counters(outputs)
    since = time.monotonic()
    failing = raw(SMALL, frame_id=FAULT_FRAME_ID)
    cameras['reliable'].publish(failing)
    values, level, message = counters(outputs, since, extra=lambda v, level, message: level == DiagnosticStatus.ERROR)
    assert 'frame skipped: OutOfMemoryError' in message and values['frames_failed'] == start['frames_failed'] + 1
    assert not any(same_stamp(m, failing.header) for m in outputs['labels'].snapshot(since))
    send_until_outputs(cameras['reliable'], raw(SMALL), outputs)  # the next frame works
    _, level, message = counters(outputs, time.monotonic())
    assert level == DiagnosticStatus.WARN and message.startswith('recovered; earlier frame skipped')
    assert active.output().count('frame skipped: OutOfMemoryError') == 1 and 'Traceback' not in active.output()


def test_output_subscribers_come_and_go(active, domain, env, client, outputs, cameras, tmp_path):
    stop, thread = stream(cameras['reliable'], lambda: raw(SMALL), 0.2)
    echo = RosProcess([sys.executable, ROS_PEER, 'echo', f'{NODE}/segmentation'], env, tmp_path / 'echo.log')
    try:
        churn = TestNode(domain, 'churn')
        since = time.monotonic()
        for _ in range(8):
            subs = [churn.node.create_subscription(msg_type, f'{NODE}/{name}', lambda msg: None, RELIABLE)
                    for name, msg_type in OUTPUT_TYPES.items()]
            time.sleep(0.25)
            for sub in subs:
                churn.node.destroy_subscription(sub)
        churn.close()  # a whole participant leaves
        assert echo.wait_for_output('frame_id: test_camera', 30), echo.output()
        echo.signal_group(signal.SIGKILL)  # a subscriber process dies without saying goodbye
        echo.popen.wait(10)
        during = len(outputs['labels'].snapshot(since))
        after = time.monotonic()
        assert outputs['labels'].wait_for(lambda m: True, 10, after=after + 1.0) is not None
    finally:
        stop.set()
        thread.join()
        echo.stop()
    assert during > 0 and active.alive() and 'Traceback' not in active.output()


def test_vocabulary_publishers_restart(active, env, client, outputs, tmp_path):
    since = time.monotonic()
    publisher_process = RosProcess([sys.executable, ROS_PEER, 'latch', f'{NODE}/vocabulary', 'tv, shelf'], env,
                                   tmp_path / 'pub.log')
    try:
        assert vocabulary_taken(outputs, ['tv', 'shelf'], since), publisher_process.output()
    finally:
        publisher_process.signal_group(signal.SIGKILL)  # the vocabulary publisher crashes
        publisher_process.stop()
    for text, names in (('lamp, rug', ['lamp', 'rug']), ('bed, desk', ['bed', 'desk'])):  # and is restarted
        since = time.monotonic()
        latched = client.publisher(String, f'{NODE}/vocabulary', LATCHED)
        latched.publish(String(data=text))
        try:
            assert vocabulary_taken(outputs, names, since), active.output()[-2000:]
        finally:
            client.node.destroy_publisher(latched)
    set_vocabulary_by_topic(client, outputs, VOCABULARY, VOCABULARY_NAMES)  # a volatile publisher still works
    assert 'Traceback' not in active.output()


# ------------------------------------------------------------------ security
def test_checkpoints_are_never_unpickled_and_received_data_never_evaluated(tmp_path):
    marker = tmp_path / 'unpickled'
    torch.save(PickledPayload(marker), tmp_path / 'evil.pth')
    with pytest.raises(WeightsError, match='cannot read weights file'):
        load_state_dict(tmp_path / 'evil.pth')
    assert not marker.exists()
    for path in sorted((ROOT / 'trident_ros').rglob('*.py')):
        tree = ast.parse(path.read_text(encoding='utf-8'))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] + [getattr(node, 'module', None) or '']
                assert not {'pickle', 'marshal', 'shelve', 'dill'} & set(modules), f'{path.name}: {modules}'
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name):
                assert func.id not in ('eval', 'exec'), f'{path.name}:{node.lineno} {func.id}'
            if isinstance(func, ast.Attribute) and getattr(func.value, 'id', '') == 'os':
                assert func.attr not in ('system', 'popen') and not func.attr.startswith('exec'), path.name
            if 'shell' in keywords:
                assert isinstance(keywords['shell'], ast.Constant) and not keywords['shell'].value, path.name
            if isinstance(func, ast.Attribute) and func.attr == 'load' and getattr(func.value, 'id', '') == 'torch':
                weights_only = keywords.get('weights_only')
                assert isinstance(weights_only, ast.Constant) and weights_only.value is True, \
                    f'{path.name}:{node.lineno}: torch.load without weights_only=True'
    # where received data goes: no file, no process
    for name in ('ros/node.py', 'ros/frame_io.py', 'ros/conversions.py', 'vocabulary.py'):
        tree = ast.parse((ROOT / 'trident_ros' / name).read_text(encoding='utf-8'))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] + [getattr(node, 'module', None) or '']
                assert not {'subprocess', 'shutil', 'pathlib'} & set(modules), f'{name}: {modules}'
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != 'open', f'{name}:{node.lineno}: open()'



# ------------------------------------------------------------------ the soak script, shutdown
def test_soak_script_short_run(domain, tmp_path):
    """bench/soak.py for ~20 s on its own domain: outputs all along, no error, a clean exit; the
    RSS slope of so short a run is noise, so only the growth is bounded here. The script starts the
    node as the launch file would (:mod:`trident_ros.ros.node_starter`), without launch.
    """
    env = ros_env((domain - 30 + 35) % 70 + 30, tmp_path)  # 30..99, not this module's domain
    report_path = tmp_path / 'soak.json'
    result = subprocess.run([sys.executable, str(ROOT / 'bench' / 'soak.py'), '--minutes', '0.35', '--sample-s', '3',
                             '--max-slope', '1e9', '--report', str(report_path), '--log', str(tmp_path / 'soak.log')],
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report['passed'] and report['outputs'] > 10 and not report['windows_without_outputs']
    assert not report['tracebacks'] and not report['error_lines'] and report['node_exited_cleanly']
    assert report['rss_end_mb'] - report['rss_start_mb'] < 100.0
    sent = report['inputs_sent']
    assert sum(v for k, v in sent.items() if k.startswith('bad_')) > 5 and sent.get('vocabulary_bad', 0) >= 1
    assert int(report['diagnostics']['frames_rejected']) > 5 and report['diagnostics']['frames_failed'] == '0'


def signal_mid_frame(process: RosProcess, publisher, outputs_topic, signum: int) -> tuple[int, float]:
    """Keep the worker busy with 640x480 frames, send ``signum`` to the node; (exit code, seconds)."""
    stop, thread = stream(publisher, lambda: raw(ROOM), 0.05)
    try:
        assert outputs_topic.wait_for(lambda m: True, 30, after=time.monotonic()) is not None, process.output()
        time.sleep(0.5)
        sent = time.monotonic()
        process.popen.send_signal(signum)  # the node itself, not its process group
        code = process.popen.wait(10)
        elapsed = time.monotonic() - sent
        print(f'\n{signal.Signals(signum).name} mid-frame: exit code {code} after {elapsed:.2f} s')
        return code, elapsed
    finally:
        stop.set()
        thread.join()


def test_sigterm_during_a_frame_exits_0_within_2_s(active, domain, env, client, tmp_path):
    """A second node (namespace /second), so that the module's node stays for the last test."""
    second = start_node(env, tmp_path / 'second.log', '-r', '__ns:=/second')
    try:
        labels = client.subscribe(Image, '/second/trident/labels')
        camera = client.publisher(Image, '/second/image', BEST_EFFORT)
        client.wait_for_node('/second/trident', second)
        for transition_id in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            assert client.change_state('/second/trident', transition_id), second.output()
        code, elapsed = signal_mid_frame(second, camera, labels, signal.SIGTERM)
    finally:
        second.stop()
    assert code == 0 and elapsed < 2.0, (code, elapsed, second.output()[-2000:])
    assert 'Traceback' not in second.output()


def test_sigint_during_a_frame_exits_0_within_2_s(active, outputs, cameras):
    code, elapsed = signal_mid_frame(active, cameras['best_effort'], outputs['labels'], signal.SIGINT)
    assert code == 0 and elapsed < 2.0, (code, elapsed, active.output()[-2000:])
    assert 'Traceback' not in active.output()
