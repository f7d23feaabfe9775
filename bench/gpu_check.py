#!/usr/bin/env python3
"""Device check: low precision against fp32 on identical random weights, stage times, latency and memory.

    python bench/gpu_check.py                          # CUDA, the paper's architectures, fp16 vs fp32
    python bench/gpu_check.py --device cpu --tiny      # seconds on a CPU (bf16 vs fp32): the test suite runs this
    python bench/gpu_check.py --node-frames 300        # also the node itself (needs tools/env.sh sourced)
    python bench/gpu_check.py --compile --onnx --node-frames 300   # the whole prepared GPU check (< 15 min)

Both pipelines get the same random weights (``random_weights`` builds them from a fixed seed), the same
``--size`` image and the same vocabulary. Low precision is fp16 on CUDA and bf16 on the CPU (the encoders'
dtypes, ``encoder_dtype``). Reported:

* precision: cosine between the low-precision and fp32 dense features per token (mean, min), the fraction
  of pixels with the same label, and the cosine of the text features (mean, min);
* per precision: median seconds per stage (``torch.cuda.synchronize`` after each, as the pipeline times
  them), a full frame (``segment``) and a relabel (``label`` of the cached image side with a new
  vocabulary), over ``--frames`` frames after one warm-up, and ``torch.cuda.max_memory_allocated``;
* the rate of flipped SAM aggregation decisions (``cos > tau`` of Trident's aggregation, per head, query and valid
  key) between low precision and fp32, from the values of SAM's last block (captured by a forward hook);
* with ``--compile``: the low precision again with ``torch.compile`` (``--compile-mode reduce-overhead`` uses CUDA
  graphs) on the stages that allow it: DINO's blocks, CLIP's blocks but the last, SAM's blocks but the last (the
  last ones hand their attention to the method's own code); its stage times and its agreement with fp32;
* with ``--onnx``: fp32 with ``models.backend: onnxruntime`` (the method's exported graphs, ``--providers``; where
  onnxruntime has only its CPU provider they run there) against fp32 torch: dense cosine and label agreement;
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
from trident_ros.stages.sam_aggregation import NEGATIVE_TAU_FALLBACK, TAU_CAP

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
    flipped_thresholds: float
    runs: dict[str, PrecisionRun]
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)
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


def compile_stages(pipeline: TridentPipeline, mode: str, backend: str) -> None:
    """``torch.compile`` the upstream modules of the stages that allow it, in place: DINO's blocks, CLIP's blocks but
    the last, SAM's encoder blocks but the last (the last ones feed the method's own code).
    """
    models = pipeline.models

    def compiled(module: torch.nn.Module) -> torch.nn.Module:
        return torch.compile(module, backend=backend, **({'mode': mode} if backend == 'inductor' else {}))

    if models.dino is not None:
        models.dino.model.blocks = compiled(models.dino.model.blocks)
    blocks = models.clip.visual.transformer.resblocks
    for index in range(len(blocks) - 1):
        blocks[index] = compiled(blocks[index])
    if models.sam is not None:
        sam_blocks = models.sam.model.image_encoder.blocks
        for index in range(len(sam_blocks) - 1):
            sam_blocks[index] = compiled(sam_blocks[index])


def capture_sam_values(pipeline: TridentPipeline, store: dict[str, torch.Tensor]) -> None:
    """Keep the values ``(heads, G, G', hd)`` of SAM's last block of every frame in ``store['v']`` (a forward hook on
    its qkv projection).
    """
    if pipeline.models.sam is None:
        return
    attention = pipeline.models.sam.last_attn

    def keep(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        batch, height, width, _ = out.shape
        qkv = out.reshape(batch, height, width, 3, attention.num_heads, -1)
        store['v'] = qkv[0, :, :, 2].permute(2, 0, 1, 3).float()

    attention.qkv.register_forward_hook(keep)


def flipped_rate(v_low: torch.Tensor, v_full: torch.Tensor, valid: tuple[int, int], cos_fac: float,
                 refine_neg_cos: bool, chunk: int = 256) -> float:
    """Fraction of (head, query, key) decisions ``cos > tau`` of Trident's aggregation (valid grid) that differ
    between two precisions' values ``(heads, G, G', hd)``; computed in fp32, ``chunk`` queries at a time.
    """
    def unit_and_tau(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = v.shape[0]
        unit = torch.nn.functional.normalize(v[:, :valid[0], :valid[1]].reshape(heads, -1, v.shape[-1]).float(),
                                             dim=-1)
        tau = (unit @ (unit.mean(dim=1, keepdim=True).transpose(1, 2) * cos_fac / heads)).sum(dim=0)[:, 0]
        if not refine_neg_cos:
            tau = torch.where(tau < 0, torch.full_like(tau, NEGATIVE_TAU_FALLBACK), tau)
        return unit, tau.clamp(max=TAU_CAP)

    (low, low_tau), (full, full_tau) = unit_and_tau(v_low.to(v_full.device)), unit_and_tau(v_full)
    flipped = 0
    for start in range(0, low.shape[1], chunk):
        rows = slice(start, start + chunk)
        low_kept = low[:, rows] @ low.transpose(1, 2) > low_tau[rows, None]
        full_kept = full[:, rows] @ full.transpose(1, 2) > full_tau[rows, None]
        flipped += int((low_kept != full_kept).sum())
    return flipped / (low.shape[0] * low.shape[1] * low.shape[1])


def run_precision(config: TridentConfig, image: np.ndarray, frames: int,
                  compile_mode: str | None = None, compile_backend: str = 'inductor',
                  ) -> tuple[PrecisionRun, dict[str, Any]]:
    """Time one precision over ``frames`` frames (after one warm-up frame; ``torch.compile`` first with
    ``compile_mode``).

    Returns:
        The run's numbers, and its outputs for the comparison: ``dense`` (E, h, w) float32 on the CPU,
        ``labels`` (H, W), ``text`` (N, E) float32 on the CPU and ``v`` (SAM's last-block values, where SAM runs).
    """
    pipeline = TridentPipeline(config)
    if compile_mode is not None:
        compile_stages(pipeline, compile_mode, compile_backend)
    captured: dict[str, torch.Tensor] = {}
    capture_sam_values(pipeline, captured)
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
               'text': vocabulary.text_features.float().cpu(), **captured}
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
    params = base.section('trident')
    valid = tuple(full['dense'].shape[1:])
    flipped = flipped_rate(reduced['v'], full['v'], valid, params.cos_fac, params.refine_neg_cos)
    runs = {full_run.dtype: full_run, low_run.dtype: low_run}
    agreement = {}
    if args.compile:
        compiled_run, compiled = run_precision(low, image, args.frames, args.compile_mode, args.compile_backend)
        runs[f'{compiled_run.dtype}+compile'] = compiled_run
        agreement['compiled'] = agree(compiled, full)
    if args.onnx:
        onnx_config = base.replace({'models.backend': 'onnxruntime', 'models.ort_providers': args.providers,
                                    'models.engine_cache_dir': args.engine_cache_dir})
        onnx_run, exported = run_precision(onnx_config, image, args.frames)
        runs[f'{onnx_run.dtype}+onnxruntime'] = onnx_run
        agreement['onnxruntime'] = agree(exported, full)
    node = run_node(args.node_frames, str(device), scale, args.node_rate) if args.node_frames else {}
    return Report(device=str(device), device_name=device_name(device), torch=torch.__version__, scale=scale,
                  size=[width, height], frames=args.frames,
                  dense_cosine_mean=float(dense_cosine.mean()), dense_cosine_min=float(dense_cosine.min()),
                  label_agreement=float(np.mean(reduced['labels'] == full['labels'])),
                  text_cosine_mean=float(text_cosine.mean()), text_cosine_min=float(text_cosine.min()),
                  flipped_thresholds=flipped, runs=runs, agreement=agreement, node=node)


def agree(outputs: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Dense cosine per token (mean, min) and label agreement of a run's outputs against fp32 torch."""
    cosine = torch.nn.functional.cosine_similarity(outputs['dense'], reference['dense'], dim=0)
    return {'dense_cosine_mean': float(cosine.mean()), 'dense_cosine_min': float(cosine.min()),
            'label_agreement': float(np.mean(outputs['labels'] == reference['labels']))}


def format_report(report: Report) -> str:
    lines = [f'{report.device} ({report.device_name}), torch {report.torch}, {report.scale} architectures, '
             f'{report.size[0]}x{report.size[1]}, {report.frames} frames per precision',
             f'dense features cosine low vs fp32: mean {report.dense_cosine_mean:.5f}, '
             f'min {report.dense_cosine_min:.5f}; '
             f'label agreement {100 * report.label_agreement:.2f}%; text features cosine mean '
             f'{report.text_cosine_mean:.5f}, min {report.text_cosine_min:.5f}; flipped aggregation thresholds '
             f'{100 * report.flipped_thresholds:.4f}%']
    for name, values in report.agreement.items():
        lines.append(f'{name} vs fp32: dense cosine mean {values["dense_cosine_mean"]:.5f}, min '
                     f'{values["dense_cosine_min"]:.5f}; label agreement {100 * values["label_agreement"]:.2f}%')
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
    parser.add_argument('--compile', action='store_true', help='also low precision with torch.compile')
    parser.add_argument('--compile-mode', default='reduce-overhead',
                        help='torch.compile mode of inductor (reduce-overhead: CUDA graphs; default, max-autotune)')
    parser.add_argument('--compile-backend', default='inductor', help='torch.compile backend (eager: a quick check)')
    parser.add_argument('--onnx', action='store_true', help='also fp32 with models.backend onnxruntime')
    parser.add_argument('--providers', default='tensorrt,cuda,cpu', help='models.ort_providers of the --onnx run')
    parser.add_argument('--engine-cache-dir', default='', help='models.engine_cache_dir of the --onnx run')
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
