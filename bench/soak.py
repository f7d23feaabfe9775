"""Soak test of the trident node: minutes of mixed good and bad input against a node it starts.

    bash tools/with_env.sh python bench/soak.py --minutes 10 --report log/soak.json

Starts the node as ``trident.launch.py`` plans it (tiny random-weight models, autostart, in the
namespace ``soak``), without ``launch`` (:mod:`trident_ros.ros.node_starter`), on this shell's
ROS_DOMAIN_ID, then, for ``--minutes``, publishes camera frames
at ``--rate`` Hz, mixing good ones (640x480 rgb8, bgr8, mono8, big-endian rgb16, 1x1, 1x2000) with
bad ones (unsupported encodings, short data, step < row, 0x0), and every few seconds a vocabulary
(good and bad alternately), a parameter change (valid or not), a phase on the compressed transport
(JPEG, PNG, truncated, random bytes) and a subscriber that comes and goes.

Every ``--sample-s`` seconds it records the node's resident memory (psutil, the node's own pid)
and the ``~/labels`` messages received since the last sample. At the end it stops the node with
SIGINT and prints a JSON report: RSS at start (after warm-up) and end, the least-squares slope in
MB/min over the samples after warm-up (and that of the per-minute minima, the baseline without
the spikes of frames in flight), inputs sent by kind, outputs, the node's last diagnostics,
``Traceback``/``[ERROR]`` lines in the node's log, and how the node exited. Exit status 0 when the
node stayed up, outputs arrived in every sample window after warm-up, the log has no traceback or
error, the slope is below ``--max-slope``, and the node exited cleanly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.srv import SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from trident_ros.ros.launch_plan import plan_launch, profile_environment
from trident_ros.ros.node_starter import autostart, package_share, start, stop

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = 'soak'
NODE = f'/{NAMESPACE}/trident'
CAMERA = f'/{NAMESPACE}/camera'
SENSOR_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
RELIABLE_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
GOOD_VOCABULARIES = ('floor, wall, door', 'sofa; couch, table, chair, lamp', 'tür 🚪, 椅子, café',
                     'sky, road, car')
BAD_VOCABULARIES = ('', ', ; ,', '   ', 'x' * 100_000)
PARAMETER_CHANGES = (('labelling.prob_thd', 0.3), ('labelling.prob_thd', -1.0), ('windows.slide_stride', 1000),
                     ('models.device', 'tpu'), ('labelling.prob_thd', 0.2), ('max_input_pixels', 0))


@dataclass
class Sample:
    t_s: float
    rss_mb: float
    outputs: int


@dataclass
class Counts:
    sent: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + 1


def _stamp(counter: list[int]) -> Header:
    counter[0] += 1
    return Header(stamp=Time(sec=1_000_000 + counter[0]), frame_id='soak_camera')


def _raw(array: np.ndarray, encoding: str, header: Header, bigendian: bool = False) -> Image:
    """``array`` (H, W) or (H, W, C) as an Image; its bytes in the array's own byte order."""
    array = np.ascontiguousarray(array)
    return Image(header=header, height=array.shape[0], width=array.shape[1], encoding=encoding,
                 is_bigendian=int(bigendian), step=array.strides[0], data=array.tobytes())


def raw_inputs(room: np.ndarray) -> list[tuple[str, Callable[[Header], Image]]]:
    """(kind, header -> message) for every raw frame the soak sends, good ones first."""
    small = np.ascontiguousarray(room[::2, ::2])

    def bad(encoding: str = 'rgb8', **fields: Any) -> Callable[[Header], Image]:
        def make(header: Header) -> Image:
            msg = _raw(small, 'rgb8', header)
            msg.encoding = encoding
            for name, value in fields.items():
                setattr(msg, name, value)
            return msg
        return make

    return [
        ('good_640x480_rgb8', lambda h: _raw(room, 'rgb8', h)),
        ('good_320x240_bgr8', lambda h: _raw(small[..., ::-1], 'bgr8', h)),
        ('good_320x240_mono8', lambda h: _raw(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), 'mono8', h)),
        ('good_320x240_rgb16_bigendian',
         lambda h: _raw((small.astype(np.uint16) * 257).astype('>u2'), 'rgb16', h, bigendian=True)),
        ('good_1x1', lambda h: _raw(np.full((1, 1, 3), 90, np.uint8), 'rgb8', h)),
        ('good_1x2000', lambda h: _raw(np.full((1, 2000, 3), 160, np.uint8), 'rgb8', h)),
        ('bad_encoding_bayer_rggb8', bad('bayer_rggb8')),
        ('bad_encoding_made_up', bad('made_up_encoding')),
        ('bad_data_short', bad(data=bytes(100))),
        ('bad_step_below_row', bad(step=10)),
        ('bad_0x0', bad(height=0, width=0, step=0, data=b'')),
    ]


def compressed_inputs(room: np.ndarray) -> list[tuple[str, bytes]]:
    bgr = cv2.cvtColor(room[::2, ::2], cv2.COLOR_RGB2BGR)
    jpeg = cv2.imencode('.jpg', bgr)[1].tobytes()
    png = cv2.imencode('.png', bgr)[1].tobytes()
    return [('good_jpeg', jpeg), ('good_png', png), ('bad_truncated_jpeg', jpeg[:len(jpeg) // 2]),
            ('bad_random_bytes', bytes(random.Random(0).randbytes(4000))), ('bad_empty', b'')]


class SoakClient:
    """The soak's own rclpy node: publishers, the labels/diagnostics subscriptions, parameter calls."""

    def __init__(self) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node('trident_soak', context=self.context)
        self.image = self.node.create_publisher(Image, CAMERA, SENSOR_QOS)
        self.compressed = self.node.create_publisher(CompressedImage, f'{CAMERA}/compressed', SENSOR_QOS)
        self.vocabulary = self.node.create_publisher(String, f'{NODE}/vocabulary', RELIABLE_QOS)
        self.parameters = self.node.create_client(SetParameters, f'{NODE}/set_parameters')
        self.outputs = 0
        self.diagnostics: dict[str, str] = {}
        self.node.create_subscription(Image, f'{NODE}/labels', self._on_labels, RELIABLE_QOS)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, RELIABLE_QOS)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        with contextlib.suppress(Exception):  # the context was shut down under it
            self.executor.spin()

    def _on_labels(self, msg: Image) -> None:
        self.outputs += 1

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(NODE):
                self.diagnostics = {kv.key: kv.value for kv in status.values}
                self.diagnostics['level'] = str(int.from_bytes(status.level, 'little')
                                                if isinstance(status.level, bytes) else status.level)
                self.diagnostics['message'] = status.message

    def set_parameter(self, name: str, value: Any) -> None:
        """Fire and forget: a refused value is the node's business (its log and diagnostics)."""
        if self.parameters.service_is_ready():
            request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
            self.parameters.call_async(request)

    def churn_subscriber(self) -> None:
        """A subscriber of ~/segmentation that exists for half a second."""
        sub = self.node.create_subscription(Image, f'{NODE}/segmentation', lambda msg: None, RELIABLE_QOS)
        time.sleep(0.5)
        self.node.destroy_subscription(sub)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()
        self._thread.join(2.0)


class Feeder:
    """What the soak sends at each of its ``rate`` steps per second (see the module docstring)."""

    def __init__(self, client: SoakClient, room: np.ndarray, rate: float) -> None:
        self.client, self.rate = client, rate
        self.raw, self.compressed = raw_inputs(room), compressed_inputs(room)
        self.counts, self.stamps = Counts(), [0]
        self.compressed_until = 0.0

    def every(self, step: int, seconds: float, offset: float = 0.0) -> int | None:
        """How many periods of ``seconds`` have passed, when ``step`` starts one (else None)."""
        period = int(self.rate * seconds)
        return step // period if step % period == int(self.rate * offset) else None

    def raw_frame(self, index: int) -> None:
        kind, make = self.raw[index % len(self.raw)]
        self.client.image.publish(make(_stamp(self.stamps)))
        self.counts.add(kind)

    def step(self, step: int, now: float) -> None:
        client = self.client
        if (period := self.every(step, 5.0)) is not None:  # a vocabulary, good and bad alternately
            texts = GOOD_VOCABULARIES if period % 2 else BAD_VOCABULARIES
            client.vocabulary.publish(String(data=texts[period // 2 % len(texts)]))
            self.counts.add('vocabulary_good' if period % 2 else 'vocabulary_bad')
        if (period := self.every(step, 7.0)) is not None:  # a parameter change, valid or not
            name, value = PARAMETER_CHANGES[period % len(PARAMETER_CHANGES)]
            client.set_parameter(name, value)
            self.counts.add(f'parameter_{name}={value}')
        if self.every(step, 11.0) is not None:  # a subscriber comes and goes
            threading.Thread(target=client.churn_subscriber, daemon=True).start()
            self.counts.add('subscriber_churn')
        if self.every(step, 30.0, offset=15.0) is not None:  # 5 s of compressed transport
            client.set_parameter('image_transport', 'compressed')
            self.compressed_until = now + 5.0
            self.counts.add('switch_to_compressed')
        if self.compressed_until and now >= self.compressed_until:
            client.set_parameter('image_transport', 'raw')
            self.compressed_until = 0.0
            self.counts.add('switch_to_raw')
        if self.compressed_until:
            kind, data = self.compressed[step % len(self.compressed)]
            client.compressed.publish(CompressedImage(header=_stamp(self.stamps), format='jpeg', data=data))
            self.counts.add(f'compressed_{kind}')
        else:  # every other step one of the 6 good frames, so that the node always has work
            self.raw_frame(step if step % 2 else step // 2 % 6)


def slope_mb_per_min(samples: list[Sample]) -> float:
    """Least-squares slope of RSS over time, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    t = np.array([s.t_s for s in samples]) / 60.0
    rss = np.array([s.rss_mb for s in samples])
    return float(np.polyfit(t, rss, 1)[0])


def floor_slope_mb_per_min(samples: list[Sample]) -> float | None:
    """Slope of the per-minute minimum RSS (MB/min): the baseline without the spikes of frames in
    flight; whole minutes only, None for less than two.
    """
    minima: dict[int, float] = {}
    for sample in samples:
        minute = int(sample.t_s // 60)
        minima[minute] = min(minima.get(minute, sample.rss_mb), sample.rss_mb)
    minutes = [m for m in sorted(minima) if samples and (m + 1) * 60 <= samples[-1].t_s]
    if len(minutes) < 2:
        return None
    return float(np.polyfit(minutes, [minima[m] for m in minutes], 1)[0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1', RCUTILS_COLORIZED_OUTPUT='0')
    plan = plan_launch({'namespace': NAMESPACE, 'image_topic': CAMERA, 'random_weights': 'true',
                        'model_scale': 'tiny', 'device': 'cpu', 'vocabulary': GOOD_VOCABULARIES[0]},
                       package_share(), env)
    room = cv2.cvtColor(cv2.imread(str(ROOT / 'trident_ros' / 'data' / 'room.png')), cv2.COLOR_BGR2RGB)
    samples: list[Sample] = []
    client = SoakClient()
    feeder = Feeder(client, room, args.rate)
    with open(log_path, 'w', encoding='utf-8') as log:
        processes = start(plan, stdout=log, env=env)
    started = time.monotonic()
    report: dict[str, Any] = {'minutes': args.minutes, 'rate_hz': args.rate, 'log': str(log_path)}
    try:
        node = psutil.Process(processes[0].popen.pid)
        autostart(processes, 90.0)
        if not wait(lambda: client.outputs > 0, 90.0, lambda: feeder.raw_frame(0)):
            raise RuntimeError(f'no output from the node within 90 s; see {log_path}')
        report['startup_s'] = round(time.monotonic() - started, 1)
        begin = time.monotonic()
        duration = args.minutes * 60.0
        next_sample, last_outputs, step = begin, client.outputs, 0
        while (now := time.monotonic()) - begin < duration:
            if not node.is_running():
                raise RuntimeError('the node process died')
            elapsed = now - begin
            feeder.step(step, now)
            if now >= next_sample:
                outputs = client.outputs
                samples.append(Sample(round(elapsed, 1), round(node.memory_info().rss / 2**20, 1),
                                      outputs - last_outputs))
                last_outputs, next_sample = outputs, next_sample + args.sample_s
            step += 1
            time.sleep(max(0.0, begin + step / args.rate - time.monotonic()))
        samples.append(Sample(round(time.monotonic() - begin, 1), round(node.memory_info().rss / 2**20, 1),
                              client.outputs - last_outputs))
        time.sleep(1.5)  # one more diagnostics message
        report['diagnostics'] = dict(client.diagnostics)
        stop_started = time.monotonic()
        report['node_exit_code'] = stop(processes)[0]  # SIGINT, as Ctrl-C in a terminal; SIGKILL after 15 s
        report['node_shutdown_s'] = round(time.monotonic() - stop_started, 2)
    finally:
        stop(processes)
        client.close()
    return summarise(report, samples, feeder.counts, log_path, args)


def wait(condition: Callable[[], bool], timeout: float, action: Callable[[], None]) -> bool:
    """Call ``action`` twice a second until ``condition()`` holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        action()
        time.sleep(0.5)
    return condition()


def summarise(report: dict[str, Any], samples: list[Sample], counts: Counts, log_path: Path,
              args: argparse.Namespace) -> dict[str, Any]:
    warmup = min(60.0, 0.25 * args.minutes * 60.0)
    steady = [s for s in samples if s.t_s >= warmup]
    text = log_path.read_text(encoding='utf-8', errors='replace')
    lines = text.splitlines()
    tracebacks = [line for line in lines if 'Traceback' in line]
    errors = [line for line in lines if '[ERROR]' in line and 'trident' in line]
    empty_windows = [s.t_s for s in steady[:-1] if s.outputs == 0]  # the last window may be short
    shutdown_s = report.get('node_shutdown_s')
    exited_cleanly = report.get('node_exit_code') == 0 and shutdown_s is not None and shutdown_s < 2.0
    report.update({
        'warmup_s': warmup,
        'samples': [vars(s) for s in samples],
        'rss_start_mb': steady[0].rss_mb if steady else None,
        'rss_end_mb': steady[-1].rss_mb if steady else None,
        'rss_max_mb': max((s.rss_mb for s in samples), default=None),
        'rss_slope_mb_per_min': round(slope_mb_per_min(steady), 3),
        'rss_floor_slope_mb_per_min': (None if (floor := floor_slope_mb_per_min(steady)) is None
                                       else round(floor, 3)),
        'outputs': sum(s.outputs for s in samples),
        'windows_without_outputs': empty_windows,
        'inputs_sent': dict(sorted(counts.sent.items())),
        'tracebacks': tracebacks[:20],
        'error_lines': errors[:20],
        'warning_lines': sum('[WARN]' in line for line in lines),
        'node_exited_cleanly': exited_cleanly,
    })
    failures = []
    if tracebacks or errors:
        failures.append(f'{len(tracebacks)} traceback(s), {len(errors)} error line(s) in {log_path}')
    if empty_windows:
        failures.append(f'no output in the windows ending at {empty_windows} s')
    if abs(report['rss_slope_mb_per_min']) > args.max_slope:
        failures.append(f'RSS slope {report["rss_slope_mb_per_min"]} MB/min exceeds {args.max_slope}')
    if not exited_cleanly:
        failures.append(f'the node did not exit cleanly within 2 s of SIGINT (took {shutdown_s} s)')
    report['failures'] = failures
    report['passed'] = not failures
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--minutes', type=float, default=10.0, help='how long to feed the node (default 10)')
    parser.add_argument('--rate', type=float, default=10.0, help='input messages per second (default 10)')
    parser.add_argument('--sample-s', type=float, default=10.0, help='RSS/output sampling period (default 10 s)')
    parser.add_argument('--max-slope', type=float, default=2.0,
                        help='largest acceptable RSS slope after warm-up, MB/min (default 2)')
    parser.add_argument('--report', default='', help='also write the JSON report to this file')
    parser.add_argument('--log', default=str(ROOT / 'log' / 'soak' / 'node.log'), help="the node's log file")
    args = parser.parse_args(argv)
    # this process publishes camera-sized images too: the package's Fast DDS profile unless one is set
    os.environ.update(profile_environment(package_share(), os.environ))
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    report = run(args)
    text = json.dumps(report, indent=1, ensure_ascii=False)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text + '\n', encoding='utf-8')
    print(text)
    print(f"soak {'PASSED' if report['passed'] else 'FAILED'}: {args.minutes} min, RSS {report['rss_start_mb']} -> "
          f"{report['rss_end_mb']} MB (slope {report['rss_slope_mb_per_min']} MB/min), {report['outputs']} outputs"
          + ''.join(f'\n  - {failure}' for failure in report['failures']), file=sys.stderr)
    return 0 if report['passed'] else 1


if __name__ == '__main__':
    sys.exit(main())
