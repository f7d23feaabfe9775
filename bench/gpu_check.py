#!/usr/bin/env python3
"""Device check: low precision against fp32 on identical random weights, stage times, latency and memory.

    python bench/gpu_check.py                          # CUDA, the paper's architectures, fp16 vs fp32
    python bench/gpu_check.py --device cpu --tiny      # seconds on a CPU (bf16 vs fp32): the test suite runs this
    python bench/gpu_check.py --node-frames 300        # also the node itself (needs tools/env.sh sourced)

Both pipelines get the same random weights (``random_weights`` builds them from a fixed seed), the same
``--size`` image and the same vocabulary. Low precision is fp16 on CUDA and bf16 on the CPU (the encoders'
dtypes, ``encoder_dtype``). Reported:

* precision: cosine between the low-precision and fp32 dense features per token (mean, min), the fraction
  of pixels with the same label, and the cosine of the text features (mean, min);
* per precision: median seconds per stage (``torch.cuda.synchronize`` after each, as the pipeline times
  them), a full frame (``segment``) and a relabel (``label`` of the cached image side with a new
  vocabulary), over ``--frames`` frames after one warm-up, and ``torch.cuda.max_memory_allocated``;
* with ``--node-frames N``: ``bench/node_bench.py --launch`` for N frames (the node on this device, random
  weights, started as its executable: no ``launch`` needed): frames published and received, the node's
  counters (processed, dropped), latency, and its diagnostics after the run (device, processing rate, GPU
  memory allocated and reserved).

Random weights make labels meaningless; agreement between precisions is still a fair measure of precision loss.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trident_ros.config import TridentConfig
from trident_ros.models import resolve_device
from trident_ros.pipeline import TridentPipeline

VOCABULARY = 'wall, floor, door, chair, table, person, window, plant'
RELABEL_VOCABULARY = 'ceiling, sofa; couch, lamp, rug, shelf'


@dataclass
class PrecisionRun:
    """One precision's numbers.

    Attributes:
        dtype: the encoders' dtype, e.g. ``float16``.
        stage_s: median seconds per pipeline stage.
        frame_s: median seconds of a full frame (image side and labelling).
        relabel_s: median seconds of labelling the cached image side with another vocabulary.
        max_memory_allocated_mb: peak CUDA memory over the runs (None on the CPU).
    """

    dtype: str
    stage_s: dict[str, float]
    frame_s: float
    relabel_s: float
    max_memory_allocated_mb: float | None


@dataclass
class Report:
    """What ``--json`` prints."""

    device: str
    device_name: str
    torch: str
    scale: str
    size: list[int]
    frames: int
    dense_cosine_mean: float
    dense_cosine_min: float
    label_agreement: float
    text_cosine_mean: float
    text_cosine_min: float
    runs: dict[str, PrecisionRun]
    node: dict[str, Any] = field(default_factory=dict)


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU's model name from /proc/cpuinfo where there is one."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    cpuinfo = Path('/proc/cpuinfo')
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return 'cpu'


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(device: torch.device, call: Any) -> tuple[Any, float]:
    """``call()`` and its seconds, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return result, time.perf_counter() - start


def run_precision(config: TridentConfig, image: np.ndarray, frames: int) -> tuple[PrecisionRun, dict[str, Any]]:
    """Time one precision over ``frames`` frames (after one warm-up frame).

    Returns:
        The run's numbers, and its outputs for the comparison: ``dense`` (E, h, w) float32 on the CPU,
        ``labels`` (H, W) and ``text`` (N, E) float32 on the CPU.
    """
    pipeline = TridentPipeline(config)
    device = pipeline.models.device
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    vocabulary = pipeline.encode_vocabulary(VOCABULARY)
    relabel_vocabulary = pipeline.encode_vocabulary(RELABEL_VOCABULARY)
    pipeline.segment(image, vocabulary)  # warm-up
    stages: dict[str, list[float]] = {}
    frame_s, relabel_s = [], []
    for _ in range(frames):
        (features, segmentation), seconds = timed(device, functools.partial(_frame, pipeline, image, vocabulary))
        frame_s.append(seconds)
        for name, value in segmentation.timings.items():
            stages.setdefault(name, []).append(value)
        _, seconds = timed(device, functools.partial(pipeline.label, features, relabel_vocabulary))
        relabel_s.append(seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == 'cuda' else None
    run = PrecisionRun(dtype=str(pipeline.models.dtype).replace('torch.', ''),
                       stage_s={name: statistics.median(values) for name, values in stages.items()},
                       frame_s=statistics.median(frame_s), relabel_s=statistics.median(relabel_s),
                       max_memory_allocated_mb=peak)
    outputs = {'dense': features.dense.float().cpu(), 'labels': segmentation.labels,
               'text': vocabulary.text_features.float().cpu()}
    return run, outputs


def _frame(pipeline: TridentPipeline, image: np.ndarray, vocabulary: Any) -> tuple[Any, Any]:
    features = pipeline.encode_image(image)
    return features, pipeline.label(features, vocabulary)


def run_node(frames: int, device: str, scale: str, rate: float) -> dict[str, Any]:
    """``bench/node_bench.py --launch`` on this device (it starts the node itself, without launch); its JSON report."""
    command = [sys.executable, str(Path(__file__).with_name('node_bench.py')), '--launch', '--frames', str(frames),
               '--rate', str(rate), '--model-scale', scale, '--device', device, '--json']
    result = subprocess.run(command, capture_output=True, text=True, timeout=600 + 2 * frames / rate)
    if result.returncode != 0:
        raise RuntimeError(f'node_bench failed ({result.returncode}):\n{result.stderr[-3000:]}')
    return json.loads(result.stdout)


def check(args: argparse.Namespace) -> Report:
    """Both precisions on the same weights and image, compared."""
    device = resolve_device(args.device)
    scale = 'tiny' if args.tiny else 'full'
    width, height = args.size
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    base = TridentConfig.from_mapping({'models.random_weights': True, 'models.model_scale': scale,
                                       'models.device': str(device), 'models.fp16': False, 'models.bf16': False})
    low = base.replace({'models.fp16': device.type == 'cuda', 'models.bf16': device.type == 'cpu'})
    full_run, full = run_precision(base, image, args.frames)
    low_run, reduced = run_precision(low, image, args.frames)
    dense_cosine = torch.nn.functional.cosine_similarity(reduced['dense'], full['dense'], dim=0)
    text_cosine = torch.nn.functional.cosine_similarity(reduced['text'], full['text'], dim=1)
    node = run_node(args.node_frames, str(device), scale, args.node_rate) if args.node_frames else {}
    return Report(device=str(device), device_name=device_name(device), torch=torch.__version__, scale=scale,
                  size=[width, height], frames=args.frames,
                  dense_cosine_mean=float(dense_cosine.mean()), dense_cosine_min=float(dense_cosine.min()),
                  label_agreement=float(np.mean(reduced['labels'] == full['labels'])),
                  text_cosine_mean=float(text_cosine.mean()), text_cosine_min=float(text_cosine.min()),
                  runs={full_run.dtype: full_run, low_run.dtype: low_run}, node=node)


def format_report(report: Report) -> str:
    lines = [f'{report.device} ({report.device_name}), torch {report.torch}, {report.scale} architectures, '
             f'{report.size[0]}x{report.size[1]}, {report.frames} frames per precision',
             f'dense features cosine low vs fp32: mean {report.dense_cosine_mean:.5f}, '
             f'min {report.dense_cosine_min:.5f}; '
             f'label agreement {100 * report.label_agreement:.2f}%; text features cosine mean '
             f'{report.text_cosine_mean:.5f}, min {report.text_cosine_min:.5f}']
    for name, run in report.runs.items():
        stages = ', '.join(f'{stage} {1000 * seconds:.1f}' for stage, seconds in run.stage_s.items())
        memory = f', max_memory_allocated {run.max_memory_allocated_mb:.0f} MB' if run.max_memory_allocated_mb else ''
        lines.append(f'{name}: frame {1000 * run.frame_s:.1f} ms, relabel {1000 * run.relabel_s:.1f} ms'
                     f'{memory}; stages (ms): {stages}')
    if report.node:
        counters = report.node['node_counters']
        lines.append(f"node: {report.node['frames_published']} frames at {report.node['rate_hz']:g} Hz, "
                     f"{report.node['segmentations_received']} segmentations received, processed "
                     f"{counters['frames_processed']}, dropped {counters['frames_dropped']}, latency median "
                     f"{report.node['latency_ms']['median']} ms; after the run: {report.node['node_status']}")
    return '\n'.join(lines)


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition('x')
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', help='cuda, cuda:N or cpu')
    parser.add_argument('--tiny', action='store_true', help='tiny architectures (seconds on a CPU)')
    parser.add_argument('--size', type=parse_size, default=(640, 480), help='WIDTHxHEIGHT of the test image')
    parser.add_argument('--frames', type=int, default=5, help='timed frames per precision (after one warm-up)')
    parser.add_argument('--node-frames', type=int, default=0, help='also run the node for this many frames')
    parser.add_argument('--node-rate', type=float, default=10.0, help='frames per second sent to the node')
    parser.add_argument('--json', action='store_true')
    args = parser.parse_args(argv)
    if args.frames < 1 or args.node_frames < 0:
        parser.error('--frames >= 1 and --node-frames >= 0 please')
    try:
        report = check(args)
    except RuntimeError as error:  # e.g. no CUDA device
        print(f'gpu_check: {error}', file=sys.stderr)
        return 1
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0


if __name__ == '__main__':
    sys.exit(main())
