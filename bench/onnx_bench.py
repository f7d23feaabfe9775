#!/usr/bin/env python3
"""torch against ONNX Runtime on the same random weights: per-stage time and peak RSS, and their agreement.

    flock /tmp/trident-heavy.lock python bench/onnx_bench.py            # full size, CPU (about 7 GiB, minutes)
    python bench/onnx_bench.py --tiny                                    # seconds: a smoke run

One fresh process per backend (``models.backend`` torch, then onnxruntime with ``models.ort_providers``), each
loading the same random weights (fixed seed), labelling the same synthetic frame: one warm-up frame, then the median
of ``--frames``. Per stage: median seconds, and the peak RSS of the process during that stage (sampled in one
more frame, a lower bound). Loading is timed apart: for onnxruntime it includes the export of the graphs into an
empty engine cache (``--cache``: a folder that already holds them times the sessions alone).
Then the dense cosine per token and the label agreement of onnxruntime against torch, and the exported files.
Random weights make labels meaningless; agreement between the backends is still a fair measure.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from trident_ros.config import TridentConfig
from trident_ros.pipeline import TridentPipeline
from trident_ros.tools.measure import BENCH_NAMES, PeakRss, cpu_name, release_freed_memory, synthetic_image


class MeasuredPipeline(TridentPipeline):
    """A pipeline whose stages also record their peak RSS (MiB) in ``peaks`` while ``sample`` is on (a frame of its
    own: the sampling thread would slow the timed frames, torch's many small calls more than ONNX Runtime's few).
    """

    def __init__(self, config: TridentConfig) -> None:
        self.peaks: dict[str, float] = {}
        self.sample = False
        super().__init__(config)

    @contextlib.contextmanager
    def _stage(self, timings: dict[str, float], name: str) -> Iterator[None]:
        if not self.sample:
            with super()._stage(timings, name):
                yield
            return
        with PeakRss() as rss, super()._stage(timings, name):
            yield
        self.peaks[name] = max(self.peaks.get(name, 0.0), rss.peak / 2**20)


def run_backend(args: argparse.Namespace) -> dict:
    """One backend in this process: load, export/build, frames; its numbers and outputs (saved to ``--out``)."""
    release_freed_memory()
    values = {'method': args.method, 'models.random_weights': True, 'models.model_scale': args.scale,
              'models.device': 'cpu', 'models.backend': args.backend, 'models.engine_cache_dir': args.cache,
              'models.ort_providers': args.providers}
    config = TridentConfig.from_mapping(values)
    image = synthetic_image(*args.size)
    with PeakRss() as load_rss:
        start = time.perf_counter()
        pipeline = MeasuredPipeline(config)
        load_s = time.perf_counter() - start
    vocabulary = pipeline.encode_vocabulary(', '.join(BENCH_NAMES))
    pipeline.segment(image, vocabulary)  # warm-up
    stages: dict[str, list[float]] = {}
    frames = []
    for _ in range(args.frames):
        start = time.perf_counter()
        features = pipeline.encode_image(image)
        segmentation = pipeline.label(features, vocabulary)
        frames.append(time.perf_counter() - start)
        for name, seconds in segmentation.timings.items():
            stages.setdefault(name, []).append(seconds)
    pipeline.sample = True
    pipeline.segment(image, vocabulary)
    np.savez(args.out, dense=features.dense.float().numpy(), labels=segmentation.labels)
    return {'backend': args.backend, 'load_s': load_s, 'load_peak_mib': load_rss.peak / 2**20,
            'stage_s': {name: statistics.median(values) for name, values in stages.items()},
            'stage_peak_mib': pipeline.peaks, 'frame_s': statistics.median(frames),
            'providers': sorted({provider for _, session in (pipeline.graphs.sessions.values() if pipeline.graphs
                                                              else []) for provider in session.get_providers()})}


def compare(args: argparse.Namespace) -> int:
    """Both backends, one fresh process each, then the table."""
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache or str(Path(scratch) / 'engines')
        for backend in ('torch', 'onnxruntime'):
            out = str(Path(scratch) / f'{backend}.npz')
            command = [sys.executable, __file__, '--backend', backend, '--method', args.method, '--scale', args.scale,
                       '--size', f'{args.size[0]}x{args.size[1]}', '--frames', str(args.frames), '--cache', cache,
                       '--providers', args.providers, '--out', out, '--child']
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stderr[-4000:], file=sys.stderr)
                return 1
            results[backend] = json.loads(result.stdout.strip().splitlines()[-1])
            outputs[backend] = np.load(out)
        files = {path.name: path.stat().st_size for path in Path(cache).glob('*.onnx')}
    reference, exported = outputs['torch'], outputs['onnxruntime']
    dense_t, dense_o = torch.from_numpy(reference['dense']), torch.from_numpy(exported['dense'])
    cosine = torch.nn.functional.cosine_similarity(dense_o.flatten(1), dense_t.flatten(1), dim=0)
    print(f'{args.method}, {args.scale} architectures, random weights, {args.size[0]}x{args.size[1]}, CPU '
          f'{cpu_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs; median of {args.frames} frames after '
          'one warm-up; one fresh process per backend')
    torch_run, ort_run = results['torch'], results['onnxruntime']
    print(f'onnxruntime providers: {", ".join(ort_run["providers"]) or "none"}')
    print(f'{"stage":<14}{"torch s":>10}{"torch MiB":>11}{"ORT s":>10}{"ORT MiB":>10}{"ratio":>8}')
    for name in dict.fromkeys([*torch_run['stage_s'], *ort_run['stage_s']]):
        t_s, o_s = torch_run['stage_s'].get(name), ort_run['stage_s'].get(name)
        t_m, o_m = torch_run['stage_peak_mib'].get(name), ort_run['stage_peak_mib'].get(name)
        ratio = f'{o_s / t_s:8.2f}' if t_s and o_s else f'{"":>8}'
        print(f'{name:<14}{_num(t_s, 10, 3)}{_num(t_m, 11, 0)}{_num(o_s, 10, 3)}{_num(o_m, 10, 0)}{ratio}')
    print(f'{"frame":<14}{torch_run["frame_s"]:>10.3f}{"":>11}{ort_run["frame_s"]:>10.3f}{"":>10}'
          f'{ort_run["frame_s"] / torch_run["frame_s"]:>8.2f}')
    print(f'{"load":<14}{torch_run["load_s"]:>10.1f}{torch_run["load_peak_mib"]:>11.0f}{ort_run["load_s"]:>10.1f}'
          f'{ort_run["load_peak_mib"]:>10.0f}   (onnxruntime: export into an empty cache + sessions)')
    print(f'dense cosine onnxruntime vs torch: min {float(cosine.min()):.6f}, mean {float(cosine.mean()):.6f}; '
          f'max abs {float((dense_o - dense_t).abs().max()):.2e}; labels equal on '
          f'{100 * float(np.mean(exported["labels"] == reference["labels"])):.3f} % of the pixels')
    for name, size in sorted(files.items()):
        print(f'  {name}: {size / 2**20:.1f} MiB')
    return 0


def _num(value: float | None, width: int, digits: int) -> str:
    return f'{value:>{width}.{digits}f}' if value is not None else f'{"-":>{width}}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--method', default='trident')
    parser.add_argument('--tiny', action='store_true', help='tiny architectures (a smoke run)')
    parser.add_argument('--size', type=lambda text: tuple(int(v) for v in text.lower().split('x')), default=(640, 480),
                        help='WIDTHxHEIGHT of the synthetic frame')
    parser.add_argument('--frames', type=int, default=2, help='timed frames per backend (after one warm-up)')
    parser.add_argument('--providers', default='cpu', help='models.ort_providers of the onnxruntime run')
    parser.add_argument('--cache', default='', help='engine cache (default: a temporary folder, so export is timed)')
    parser.add_argument('--backend', help=argparse.SUPPRESS)
    parser.add_argument('--scale', help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scale = args.scale or ('tiny' if args.tiny else 'full')
    if args.child:
        print(json.dumps(run_backend(args)))
        return 0
    return compare(args)


if __name__ == '__main__':
    sys.exit(main())
