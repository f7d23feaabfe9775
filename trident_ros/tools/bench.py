"""`trident-bench`: how fast is Trident here, and how close to the cost of its encoders?

Runs the pipeline (random weights: cost does not depend on weight values) on a given or generated
image, warm-up then N repetitions, and reports per-stage median/min times, the encoders-only time
(the same SAM/DINO/CLIP forwards, timed alone in the same run), the overhead ratio (full frame /
encoders-only), the relabel ratio (vocabulary change on a cached frame / full frame), what an
unchanged frame costs with ``reuse_threshold`` on, text-feature
time against open_clip's standard ``encode_text`` path, the peak extra memory the aggregation adds
to SAM's encoder (it is fused into the encoder's last block),
the peak RSS after the first repetition (models, vocabulary and one frame: the "full frame" memory)
and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from trident_ros.config import TridentConfig
from trident_ros.pipeline import TridentPipeline
from trident_ros.stages.sam_aggregation import SamAggregation, aggregation_chunk_bytes
from trident_ros.stages.windows import cut_windows, normalise
from trident_ros.tools.measure import (
    BENCH_NAMES,
    CLOCKS,
    PeakRss,
    Timing,
    cpu_name,
    parse_size,
    release_freed_memory,
    synthetic_image,
    time_call,
    timed_call,
)
from trident_ros.tools.method_bench import benchmark_methods, format_method_table
from trident_ros.vocabulary import IMAGENET_TEMPLATES, TextFeatureCache, Vocabulary

NEW_NAMES = ('sofa', 'window', 'plant', 'floor')


@torch.inference_mode()
def encoders_only(pipeline: TridentPipeline, image: np.ndarray) -> Callable[[], object]:
    """The encoder forwards a frame needs, without any other stage: SAM's image encoder on the
    prepared input, DINO and CLIP over the same crops (CLIP up to its last block's values).
    """
    windows, models = pipeline.config.windows, pipeline.models
    sam_input = models.sam.prepare(image)
    _, _, crops = cut_windows(image, windows.input_short_side, windows.max_long_side, windows.slide_crop,
                              windows.slide_stride, pipeline.crop_multiple, models.device)
    dino_in = normalise(crops, models.dino.mean, models.dino.std, models.dtype)
    clip_in = normalise(crops, models.clip.mean, models.clip.std, models.dtype)

    def run() -> None:
        with torch.inference_mode():
            models.sam.model.image_encoder(sam_input)
            models.dino.patch_features(dino_in)
            models.clip.last_block_values(clip_in)
    return run


@torch.inference_mode()
def reused_frame_time(pipeline: TridentPipeline, config: TridentConfig, image: np.ndarray, vocabulary: Vocabulary,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds for a frame equal to the last encoded one with ``reuse_threshold`` on: the
    comparison, the reused image side and labelling with ``config`` (one frame is encoded first).
    """
    pipeline.apply_label_config(config.replace({'windows.reuse_threshold': 1.0}))
    pipeline.encode_image(image)
    reuses = pipeline.image_side_reuses
    seconds = time_call(lambda: pipeline.label(pipeline.encode_image(image), vocabulary), pipeline.models.device, clock)
    if pipeline.image_side_reuses != reuses + 1:
        raise RuntimeError('the unchanged frame was encoded again')
    return seconds


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over repetitions of ``numerator / denominator`` measured in the same repetition."""
    return statistics.median(a / b for a, b in zip(numerator.samples, denominator.samples, strict=True))


@torch.inference_mode()
def text_timings(pipeline: TridentPipeline, names: tuple[str, ...],
                 clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """(ours, open_clip standard) seconds to get text features of ``names`` not yet cached."""
    models = pipeline.models
    cache = TextFeatureCache(models.clip.model, models.tokenizer, models.device, models.dtype, 64)
    ours = time_call(lambda: cache.features(list(names)), models.device, clock)
    prompts = [template(name) for name in names for template in IMAGENET_TEMPLATES]
    tokens = models.tokenizer(prompts).to(models.device)
    standard = time_call(lambda: models.clip.model.encode_text(tokens), models.device, clock)
    return ours, standard


def run_benchmark(config: TridentConfig, image: np.ndarray, repeat: int, warmup: int, clock: str = 'wall') -> dict:
    tick = CLOCKS[clock]
    pipeline = TridentPipeline(config)
    device = pipeline.models.device
    vocabulary = pipeline.encode_vocabulary(', '.join(BENCH_NAMES))
    relabel_vocabulary = pipeline.encode_vocabulary(', '.join(reversed(BENCH_NAMES)))
    refine_on, refine_off = config.replace({'refinement.refine': True}), config.replace({'refinement.refine': False})
    encoders = encoders_only(pipeline, image)
    stages: dict[str, Timing] = {}
    results = {name: Timing() for name in ('encoders_only', 'image_side', 'full_refine_off', 'full_refine_on',
                                           'relabel_refine_off', 'relabel_refine_on')}
    frame_rss = 0
    for rep in range(warmup + repeat):
        measured = rep >= warmup
        t_enc = time_call(encoders, device, tick)
        t_img, features = timed_call(partial(pipeline.encode_image, image), device, tick)
        labels = {}
        for mode, cfg in (('off', refine_off), ('on', refine_on)):
            pipeline.apply_label_config(cfg)
            t_label, labels[mode] = timed_call(partial(pipeline.label, features, vocabulary), device, tick)
            t_relabel = time_call(partial(pipeline.label, features, relabel_vocabulary), device, tick)
            if measured:
                results[f'full_refine_{mode}'].samples.append(t_img + t_label)
                results[f'relabel_refine_{mode}'].samples.append(t_relabel)
        if measured:
            results['encoders_only'].samples.append(t_enc)
            results['image_side'].samples.append(t_img)
            for name, seconds in labels['on'].timings.items():
                stages.setdefault(name, Timing()).samples.append(seconds)
        if rep == 0:
            frame_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reused = reused_frame_time(pipeline, config.replace({'refinement.refine': False}), image, vocabulary, tick)
    pipeline.apply_label_config(config)

    text_ours, text_standard = text_timings(pipeline, NEW_NAMES, tick)
    aggregation = aggregation_memory(pipeline, image)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        'device': str(device),
        'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name(),
        'dtype': str(pipeline.models.dtype).replace('torch.', ''),
        'threads': torch.get_num_threads(),
        'clock': clock,
        'torch': torch.__version__,
        'model_scale': config.models.model_scale,
        'image_size': [int(image.shape[1]), int(image.shape[0])],
        'repeat': repeat,
        'stages_s': {name: {'median': t.median, 'min': t.min} for name, t in stages.items()},
        'totals_s': {name: {'median': t.median, 'min': t.min, 'samples': t.samples} for name, t in results.items()},
        # each repetition's full frame over the encoders-only run just before it, median over repetitions
        # (load from other processes drifts over a run: adjacent pairs see the same load)
        'overhead_ratio_refine_off': paired_ratio(results['full_refine_off'], results['encoders_only']),
        'overhead_ratio_refine_on': paired_ratio(results['full_refine_on'], results['encoders_only']),
        'relabel_ratio_refine_off': results['relabel_refine_off'].median / results['full_refine_off'].median,
        'relabel_ratio_refine_on': results['relabel_refine_on'].median / results['full_refine_on'].median,
        'reused_frame_refine_off_s': reused,
        'reused_frame_ratio': reused / results['full_refine_off'].median,
        # other processes on the machine only ever add time: the minimums are the steadier estimate
        'overhead_ratio_refine_off_min': results['full_refine_off'].min / results['encoders_only'].min,
        'overhead_ratio_refine_on_min': results['full_refine_on'].min / results['encoders_only'].min,
        'text_new_names_s': text_ours,
        'text_open_clip_standard_s': text_standard,
        'text_ratio': text_ours / text_standard,
        'aggregation_s': aggregation.seconds,
        'aggregation_chunk': config.section('trident').aggregation_chunk,
        'aggregation_tokens': list(aggregation.tokens),
        'aggregation_peak_extra_bytes': aggregation.peak_extra_bytes,
        'aggregation_chunk_blocks_bytes': aggregation.chunk_blocks_bytes,
        'aggregation_memory_method': aggregation.method,
        'peak_rss_frame_bytes': frame_rss,
        'peak_rss_bytes': peak_rss,
    }
    return report


@dataclass
class AggregationMemory:
    """The memory of the aggregation, fused into SAM's encoder, on one square frame."""

    tokens: tuple[int, int]
    """SAM's valid token grid of the measured frame (64 x 64 at full scale)."""
    peak_extra_bytes: int
    """What the aggregation holds at most on top of the encoder: its state (resized features,
    output, unit values) plus the largest transient memory of one block of rows."""
    seconds: float
    method: str
    """How ``peak_extra_bytes`` was measured."""
    chunk_blocks_bytes: int
    """What the chunk-sized block takes at most, computed (part of ``peak_extra_bytes``)."""


class _MeasuredAggregation:
    """Wraps a SamAggregation (as the encoder's observer) and measures its own memory: what
    ``start`` leaves allocated, and the peak of every ``rows`` call above the memory at its entry.
    """

    def __init__(self, make: Callable[[], SamAggregation], device: torch.device) -> None:
        self.device = device
        before = self._allocated()
        self.inner = make()
        self.state = self._allocated() - before
        self.transient = 0

    def _allocated(self) -> int:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        import psutil

        return psutil.Process().memory_info().rss

    def start(self, v: torch.Tensor) -> None:
        before = self._allocated()
        self.inner.start(v)
        self.state += self._allocated() - before

    def rows(self, rows: slice, attention: torch.Tensor) -> None:
        if self.device.type == 'cuda':
            entry = self._allocated()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.inner.rows(rows, attention)
            torch.cuda.synchronize(self.device)
            self.transient = max(self.transient, torch.cuda.max_memory_allocated(self.device) - entry)
            return
        with PeakRss() as peak:
            self.inner.rows(rows, attention)
        self.transient = max(self.transient, peak.extra)


@torch.inference_mode()
def aggregation_memory(pipeline: TridentPipeline, image: np.ndarray) -> AggregationMemory:
    """Peak extra memory and time of the aggregation on a square crop of ``image`` (all of SAM's
    64 x 64 tokens valid at full scale; random spliced features), measured around each of its
    calls inside SAM's encoder. On the CPU this calls :func:`release_freed_memory` (so run it
    last: later allocations are slower).
    """
    models, cfg = pipeline.models, pipeline.config.section('trident')
    sam, device = models.sam, models.device
    side = min(image.shape[:2])
    valid = sam.token_grid(side, side)
    width = models.clip.model.visual.transformer.width
    spliced = torch.randn(width, valid[0] * 2, valid[1] * 2, device=device, dtype=models.dtype)
    blocks = aggregation_chunk_bytes(sam.last_attn.num_heads, valid, cfg.aggregation_chunk, sam.dtype.itemsize)
    if device.type == 'cuda':
        method = 'torch.cuda.memory_allocated / max_memory_allocated around each call'
    else:
        method = 'RSS (psutil) around each call, sampled every 0.5 ms during it'
        if release_freed_memory():
            method += ', glibc malloc_trim + mmap threshold 64 KiB (RSS follows live tensors)'
    measured = _MeasuredAggregation(
        lambda: SamAggregation(spliced, valid, cfg.cos_fac, cfg.refine_neg_cos, cfg.aggregation_chunk), device)
    sam.encode(np.ascontiguousarray(image[:side, :side]), observer=measured)
    return AggregationMemory(valid, measured.state + measured.transient, measured.inner.seconds, method, blocks)


def format_table(report: dict) -> str:
    ms = lambda s: f'{1000 * s:9.1f}'  # noqa: E731
    lines = [
        f"device: {report['device']} ({report['device_name']}), dtype {report['dtype']}, "
        f"threads {report['threads']}, torch {report['torch']}, models {report['model_scale']}, "
        f"clock {report['clock']} "
        f"(totals, ratios, text; stages: the pipeline's own wall-clock timings), "
        f"image {report['image_size'][0]}x{report['image_size'][1]}, repetitions {report['repeat']}",
        '',
        f"{'stage':<22}{'median ms':>10}{'min ms':>10}",
    ]
    for name, t in report['stages_s'].items():
        lines.append(f'{name:<22}{ms(t["median"])} {ms(t["min"])}')
    lines += ['', f"{'total':<22}{'median ms':>10}{'min ms':>10}"]
    for name, t in report['totals_s'].items():
        lines.append(f'{name:<22}{ms(t["median"])} {ms(t["min"])}')
    lines += [
        '',
        f"overhead ratio (full frame / encoders-only, median of each repetition's ratio): "
        f"refine off {report['overhead_ratio_refine_off']:.3f}, "
        f"refine on {report['overhead_ratio_refine_on']:.3f} (from the minimums: "
        f"{report['overhead_ratio_refine_off_min']:.3f}, {report['overhead_ratio_refine_on_min']:.3f})",
        f"relabel ratio (vocabulary change / full frame): refine off {report['relabel_ratio_refine_off']:.4f}, "
        f"refine on {report['relabel_ratio_refine_on']:.4f}",
        f"unchanged frame with reuse_threshold on, refine off: {ms(report['reused_frame_refine_off_s']).strip()} ms "
        f"(ratio to a full frame {report['reused_frame_ratio']:.4f})",
        f"text features, {len(NEW_NAMES)} new names x {len(IMAGENET_TEMPLATES)} templates: "
        f"{ms(report['text_new_names_s']).strip()} ms vs open_clip encode_text "
        f"{ms(report['text_open_clip_standard_s']).strip()} ms "
        f"(ratio {report['text_ratio']:.3f})",
        f"aggregation (chunk {report['aggregation_chunk']}, "
        f"{report['aggregation_tokens'][0]}x{report['aggregation_tokens'][1]} tokens, fused into SAM's encoder): "
        f"{ms(report['aggregation_s']).strip()} ms, "
        f"peak extra memory {report['aggregation_peak_extra_bytes'] / 2**20:.1f} MiB "
        f"(its chunk block {report['aggregation_chunk_blocks_bytes'] / 2**20:.1f} MiB computed; "
        f"{report['aggregation_memory_method']})",
        f"peak RSS after the first repetition (models, vocabulary, one frame): "
        f"{report['peak_rss_frame_bytes'] / 2**30:.2f} GiB ({report['peak_rss_frame_bytes'] / 1e9:.2f} GB)",
        f"peak RSS of the process (models included): {report['peak_rss_bytes'] / 2**30:.2f} GiB",
    ]
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='trident-bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=parse_size, default=(640, 480), help='generated image WIDTHxHEIGHT')
    parser.add_argument('--image', help='benchmark on this image file instead')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--fp32', action='store_true', help='no fp16 on CUDA')
    parser.add_argument('--bf16', action='store_true', help='bfloat16 encoders on the CPU')
    parser.add_argument('--tiny', action='store_true', help='small test architectures (seconds)')
    parser.add_argument('--aggregation-chunk', type=int, help='queries per aggregation chunk (default: config)')
    parser.add_argument('--clock', choices=sorted(CLOCKS), default='wall',
                        help="totals in elapsed time, or in this process's CPU time (steadier on a shared CPU)")
    parser.add_argument('--method', choices=('trident', 'all'), default='trident',
                        help="trident: the per-stage table above; all: one row per method of the method "
                             'parameter (full-frame time, ratio to trident, models loaded, peak memory)')
    parser.add_argument('--methods', help='with --method all: these methods only (comma-separated, in this order)')
    parser.add_argument('--preset', action='store_true',
                        help="with --method all: each method with its authors' preset (default: the plain defaults, "
                             'the same settings for all)')
    parser.add_argument('--json', action='store_true', help='print the report as JSON')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='[%(levelname)s] %(name)s: %(message)s')
    config = TridentConfig.from_mapping({
        'models.random_weights': True, 'models.model_scale': 'tiny' if args.tiny else 'full',
        'models.device': args.device, 'models.fp16': not args.fp32, 'models.bf16': args.bf16})
    if args.aggregation_chunk is not None:
        config = config.replace({'trident.aggregation_chunk': args.aggregation_chunk})
    if args.image:
        import cv2

        bgr = cv2.imread(args.image, cv2.IMREAD_COLOR)
        if bgr is None:
            parser.error(f'cannot read {args.image}')
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    else:
        image = synthetic_image(*args.size)
    if args.method == 'all':
        methods = [name.strip() for name in args.methods.split(',')] if args.methods else None
        rows = benchmark_methods(image, args.repeat, args.warmup, args.tiny, args.device, methods, args.bf16,
                                 args.preset)
        print(json.dumps(rows, indent=2) if args.json else format_method_table(rows))
        return 0
    report = run_benchmark(config, image, args.repeat, args.warmup, args.clock)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


if __name__ == '__main__':
    sys.exit(main())
