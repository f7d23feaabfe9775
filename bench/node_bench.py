#!/usr/bin/env python3
"""Node benchmark: publish N camera frames at a set rate to a running ``trident`` node and measure
what reaches ``~/segmentation``.

    source tools/env.sh
    python bench/node_bench.py --launch                    # starts the node itself (tiny, random weights)
    python bench/node_bench.py --frames 30 --rate 2        # against a node already running, e.g.
        ros2 launch trident_ros trident.launch.py random_weights:=true model_scale:=tiny

``--launch`` needs no ``launch``: it starts the node as ``trident.launch.py`` plans it (its executable,
configured and activated over its lifecycle services, :mod:`trident_ros.ros.node_starter`).

Each frame is a 640x480 rgb8 ``sensor_msgs/Image`` (``--size``), built before the run, whose
``header.frame_id`` (``node_bench/<i>``) the node copies to its outputs. Per frame:

* end-to-end latency: from just before ``publish()`` to the ``~/segmentation`` callback here
  (one process, one monotonic clock);
* the node's own timings, from its ``/diagnostics`` status (``latency_ms.*`` of the last frame it
  published, named by ``latency_frame_id``; diagnostics come once a second, so only the frames
  they happen to describe get these);
* pipeline time = ``total - conversion - publish`` (the node's ``encode_image`` + ``label`` calls);
* overhead = end-to-end latency - pipeline time: transport both ways, the wait for the worker
  thread (``queue``), msg -> array (``conversion``), the overlay and output messages
  (``publish``).

Counts: frames published, segmentations received, and the node's own counters (received,
processed, dropped = replaced by a newer frame before the worker took them) over the run. Warm-up
frames (``--warmup``) are published and waited for first, and left out of every number.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from trident_ros.ros.launch_plan import plan_launch
from trident_ros.ros.node_starter import NodeProcess, autostart, package_share, start, stop

FRAME_PREFIX = 'node_bench/'
RELIABILITY = {'best_effort': ReliabilityPolicy.BEST_EFFORT, 'reliable': ReliabilityPolicy.RELIABLE}
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)
NODE_COUNTERS = ('frames_received', 'frames_processed', 'frames_dropped', 'frames_rejected', 'frames_failed',
                 'frames_skipped_no_subscribers')
# The node's own state at the end of the run (GPU memory only on CUDA).
NODE_STATUS = ('device', 'processing_rate_hz', 'gpu_memory_allocated_mb', 'gpu_memory_reserved_mb')


@dataclass
class Frame:
    """One published frame; times are ``time.monotonic()`` seconds."""

    index: int
    published: float = 0.0
    received: float | None = None
    node_ms: dict[str, float] | None = None
    """The node's ``latency_ms.*`` diagnostics of this frame, when a diagnostics message described it."""

    @property
    def latency_ms(self) -> float | None:
        return None if self.received is None else 1000.0 * (self.received - self.published)

    @property
    def pipeline_ms(self) -> float | None:
        if self.node_ms is None:
            return None
        return self.node_ms['total'] - self.node_ms.get('conversion', 0.0) - self.node_ms.get('publish', 0.0)


@dataclass
class Summary:
    """Distribution of a list of milliseconds."""

    count: int
    median: float | None = None
    p90: float | None = None
    min: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            return cls(0)
        ordered = sorted(values)
        return cls(len(ordered), statistics.median(ordered), float(np.percentile(ordered, 90)), ordered[0],
                   ordered[-1])


@dataclass
class Report:
    """What ``--json`` prints."""

    size: list[int]
    rate_hz: float
    frames_published: int
    segmentations_received: int
    node_counters: dict[str, int]
    latency_ms: Summary
    pipeline_ms: Summary
    overhead_ms: Summary
    overhead_parts_ms: dict[str, float] = field(default_factory=dict)
    """Medians over the frames with node timings: queue, conversion, publish, and the rest (transport)."""
    node_stage_ms: dict[str, float] = field(default_factory=dict)
    """Medians of the node's per-stage timings over the same frames."""
    node_status: dict[str, str] = field(default_factory=dict)
    """:data:`NODE_STATUS` values of the node's diagnostics status after the run, where present."""


def synthetic_frame(width: int, height: int, seed: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB: smooth colour blobs, different for every seed."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(height // 40, 2), max(width // 40, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def image_message(rgb: np.ndarray, index: int) -> Image:
    height, width = rgb.shape[:2]
    msg = Image(header=Header(frame_id=f'{FRAME_PREFIX}{index}'), height=height, width=width, encoding='rgb8',
                is_bigendian=0, step=width * 3)
    msg.data = np.ascontiguousarray(rgb).tobytes()
    return msg


class NodeBench(Node):
    """Publishes the frames and listens to ``<node>/segmentation`` and ``/diagnostics``."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__('node_bench')
        self.target = args.node.rstrip('/')
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=RELIABILITY[args.reliability],
                         durability=DurabilityPolicy.VOLATILE)
        self.image_pub = self.create_publisher(Image, args.image_topic, qos)
        self.vocabulary_pub = self.create_publisher(String, f'{self.target}/vocabulary', OUTPUT_QOS)
        self.create_subscription(Image, f'{self.target}/segmentation', self._on_segmentation, OUTPUT_QOS)
        self.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 50)
        self.frames: dict[int, Frame] = {}
        self.received_order: list[int] = []
        self.diagnostics: dict[str, dict[str, str]] = {}  # latency_frame_id -> the first status describing it
        self.latest: dict[str, str] | None = None
        self.latest_at = 0.0

    def _on_segmentation(self, msg: Image) -> None:
        now = time.monotonic()
        if not msg.header.frame_id.startswith(FRAME_PREFIX):
            return
        frame = self.frames.get(int(msg.header.frame_id[len(FRAME_PREFIX):]))
        if frame is not None and frame.received is None:
            frame.received = now
            self.received_order.append(frame.index)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(f'{self.target}:'):
                values = {kv.key: kv.value for kv in status.values}
                self.latest, self.latest_at = values, time.monotonic()
                if values.get('latency_frame_id', '').startswith(FRAME_PREFIX):
                    self.diagnostics.setdefault(values['latency_frame_id'], values)

    def spin_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rclpy.spin_once(self, timeout_sec=min(0.01, max(0.0, deadline - time.monotonic())))

    def wait_until(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f'waited {timeout:.0f} s for {what}')
            rclpy.spin_once(self, timeout_sec=0.05)

    def fresh_status(self, timeout: float) -> dict[str, str]:
        """The next diagnostics status of the node (one newer than now)."""
        since = time.monotonic()
        self.wait_until(lambda: self.latest is not None and self.latest_at > since, timeout,
                        f'a diagnostics status of {self.target}')
        return dict(self.latest)


def run(args: argparse.Namespace) -> Report:
    width, height = args.size
    total = args.warmup + args.frames
    messages = [image_message(synthetic_frame(width, height, seed=i), i) for i in range(total)]
    bench = NodeBench(args)
    try:
        bench.wait_until(lambda: bench.image_pub.get_subscription_count() > 0
                         and bench.count_publishers(f'{bench.target}/segmentation') > 0, args.ready_timeout,
                         f'{bench.target} to subscribe to {args.image_topic} and publish segmentation (is it active?)')
        status = bench.fresh_status(args.ready_timeout)
        if status.get('lifecycle_state') != 'active':
            raise RuntimeError(f'{bench.target} is {status.get("lifecycle_state")}, not active')
        if status.get('vocabulary_size', '0') == '0':
            bench.wait_until(lambda: bench.vocabulary_pub.get_subscription_count() > 0, 10, 'the vocabulary topic')
            bench.vocabulary_pub.publish(String(data=args.vocabulary))
            bench.wait_until(lambda: (bench.latest or {}).get('vocabulary_size', '0') != '0', 30,
                             'the node to take the vocabulary')
        for index in range(args.warmup):  # one at a time, each waited for
            publish(bench, messages[index])
            bench.wait_until(lambda index=index: bench.frames[index].received is not None, args.timeout,
                             f'warm-up frame {index}')
        before = bench.fresh_status(5.0)
        period = 1.0 / args.rate
        start = time.monotonic()
        for index in range(args.warmup, total):
            due = start + (index - args.warmup) * period
            while time.monotonic() < due:
                rclpy.spin_once(bench, timeout_sec=min(0.005, max(0.0, due - time.monotonic())))
            publish(bench, messages[index])
        measured = [bench.frames[i] for i in range(args.warmup, total)]
        last = time.monotonic()
        while any(f.received is None for f in measured) and time.monotonic() - last < args.timeout:
            rclpy.spin_once(bench, timeout_sec=0.05)
        bench.spin_for(1.0)  # a dropped frame's successor may still be on its way
        after = bench.fresh_status(5.0)
        attach_node_timings(bench, measured)
    finally:
        bench.destroy_node()
    return summarise(args, measured, before, after)


def publish(bench: NodeBench, msg: Image) -> None:
    index = int(msg.header.frame_id[len(FRAME_PREFIX):])
    frame = bench.frames.setdefault(index, Frame(index))
    msg.header.stamp = bench.get_clock().now().to_msg()
    frame.published = time.monotonic()
    bench.image_pub.publish(msg)


def attach_node_timings(bench: NodeBench, frames: list[Frame]) -> None:
    """Give each frame the node's timings of it, from the diagnostics status naming it."""
    for frame in frames:
        values = bench.diagnostics.get(f'{FRAME_PREFIX}{frame.index}')
        if values is not None:
            frame.node_ms = {key[len('latency_ms.'):]: float(value) for key, value in values.items()
                             if key.startswith('latency_ms.')}


def summarise(args: argparse.Namespace, measured: list[Frame], before: dict[str, str],
              after: dict[str, str]) -> Report:
    timed = [f for f in measured if f.node_ms is not None and f.latency_ms is not None]
    overhead = [f.latency_ms - f.pipeline_ms for f in timed]
    parts: dict[str, float] = {}
    if timed:
        for name in ('queue', 'conversion', 'publish'):
            parts[name] = statistics.median(f.node_ms.get(name, 0.0) for f in timed)
        parts['transport_and_rest'] = statistics.median(
            f.latency_ms - f.pipeline_ms - sum(f.node_ms.get(n, 0.0) for n in ('queue', 'conversion', 'publish'))
            for f in timed)
    stage_names = sorted({name for f in timed for name in f.node_ms} - {'queue', 'conversion', 'publish', 'total'})
    stages = {name: statistics.median(f.node_ms.get(name, 0.0) for f in timed) for name in stage_names}
    return Report(
        size=list(args.size), rate_hz=args.rate, frames_published=len(measured),
        segmentations_received=sum(f.received is not None for f in measured),
        node_counters={name: int(after.get(name, 0)) - int(before.get(name, 0)) for name in NODE_COUNTERS},
        latency_ms=Summary.of([f.latency_ms for f in measured if f.latency_ms is not None]),
        pipeline_ms=Summary.of([f.pipeline_ms for f in timed]),
        overhead_ms=Summary.of(overhead), overhead_parts_ms=parts, node_stage_ms=stages,
        node_status={name: after[name] for name in NODE_STATUS if name in after})


def format_report(report: Report) -> str:
    def row(name: str, s: Summary) -> str:
        if not s.count:
            return f'{name:<34}{"-":>9}'
        return f'{name:<34}{s.median:9.1f}{s.p90:9.1f}{s.min:9.1f}{s.max:9.1f}{s.count:7d}'

    counters = report.node_counters
    lines = [
        f'{report.frames_published} frames of {report.size[0]}x{report.size[1]} rgb8 at {report.rate_hz:g} Hz: '
        f'{report.segmentations_received} segmentations received, '
        f'{report.frames_published - report.segmentations_received} not',
        f"node counters over the run: received {counters['frames_received']}, processed "
        f"{counters['frames_processed']}, dropped (replaced while busy) {counters['frames_dropped']}, rejected "
        f"{counters['frames_rejected']}, failed {counters['frames_failed']}",
        '',
        f'{"ms":<34}{"median":>9}{"p90":>9}{"min":>9}{"max":>9}{"frames":>7}',
        row('end-to-end latency', report.latency_ms),
        row('pipeline (encode_image + label)', report.pipeline_ms),
        row('overhead = latency - pipeline', report.overhead_ms),
    ]
    if report.overhead_parts_ms:
        parts = report.overhead_parts_ms.items()
        lines.append('overhead parts (medians): ' + ', '.join(f'{k} {v:.1f}' for k, v in parts))
    if report.node_stage_ms:
        lines.append('pipeline stages (medians): ' + ', '.join(f'{k} {v:.1f}' for k, v in report.node_stage_ms.items()))
    if report.node_status:
        lines.append('node after the run: ' + ', '.join(f'{k} {v}' for k, v in report.node_status.items()))
    return '\n'.join(lines)


def launch_arguments(args: argparse.Namespace) -> dict[str, str]:
    """The launch arguments of the node ``--launch`` starts: random weights, this run's topic and vocabulary."""
    values = {'random_weights': 'true', 'model_scale': args.model_scale, 'image_topic': args.image_topic,
              'vocabulary': args.vocabulary, 'log_level': 'warn'}
    if args.device:
        values['device'] = args.device
    return values


def launch_node(args: argparse.Namespace) -> list[NodeProcess]:
    """Start the node as ``trident.launch.py`` with :func:`launch_arguments` plans it (not yet configured)."""
    return start(plan_launch(launch_arguments(args), package_share(), os.environ),
                 stdout=None if args.verbose else subprocess.DEVNULL)


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split('x'))
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--frames', type=int, default=30, help='frames measured (after the warm-up)')
    parser.add_argument('--rate', type=float, default=2.0, help='frames per second')
    parser.add_argument('--warmup', type=int, default=3, help='frames published first, one at a time, not measured')
    parser.add_argument('--size', type=parse_size, default=(640, 480), help='WIDTHxHEIGHT')
    parser.add_argument('--image-topic', default='/camera/image_raw', help="the node's image input")
    parser.add_argument('--node', default='/trident', help='the node (its outputs are <node>/segmentation, ...)')
    parser.add_argument('--vocabulary', default='door, chair, table, person',
                        help='sent on <node>/vocabulary if the node has none')
    parser.add_argument('--reliability', choices=sorted(RELIABILITY), default='best_effort')
    parser.add_argument('--timeout', type=float, default=60.0, help='seconds to wait for outstanding results')
    parser.add_argument('--ready-timeout', type=float, default=180.0, help='seconds to wait for the node')
    parser.add_argument('--launch', action='store_true',
                        help='start the node (random weights) and stop it after; as trident.launch.py plans it, '
                             'without launch (its executable, configured and activated here)')
    parser.add_argument('--model-scale', choices=('tiny', 'full'), default='tiny', help='with --launch')
    parser.add_argument('--device', default='', help='with --launch: auto, cpu, cuda')
    parser.add_argument('--verbose', action='store_true', help="with --launch: show the node's output")
    parser.add_argument('--domain-id', type=int, help='ROS_DOMAIN_ID for this run (and the launched node)')
    parser.add_argument('--json', action='store_true')
    args = parser.parse_args(argv)
    if args.frames < 1 or args.rate <= 0 or args.warmup < 0:
        parser.error('--frames >= 1, --rate > 0 and --warmup >= 0 please')
    if args.domain_id is not None:
        os.environ['ROS_DOMAIN_ID'] = str(args.domain_id)
    processes = launch_node(args) if args.launch else []
    try:
        autostart(processes, args.ready_timeout)  # configure and activate it
        rclpy.init()
        report = run(args)
    finally:
        rclpy.try_shutdown()
        stop(processes)
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0


if __name__ == '__main__':
    sys.exit(main())
