"""Speed tiers: every segmentation method on the same frame, one row each.

Each method runs in a fresh process (spawned), so its peak memory is its own: the process's peak
RSS on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA (models included in both). Random
weights: cost does not depend on weight values. A full frame is ``encode_image`` + ``label`` with a
cached vocabulary (SAM refinement included for ``trident``), as ``trident-bench``'s
``full_refine_on``.
"""
from __future__ import annotations

import multiprocessing
import resource
import statistics
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from trident_ros.config import ModelsConfig, TridentConfig
from trident_ros.labelling import Segmentation
from trident_ros.methods import names as method_names
from trident_ros.models import resolve_device
from trident_ros.pipeline import ImageFeatures, TridentPipeline
from trident_ros.tools.measure import BENCH_NAMES, cpu_name, time_call, timed_call


def measure_method(method: str, image: np.ndarray, repeat: int, warmup: int, tiny: bool, device: str,
                   bf16: bool = False, preset: bool = False) -> dict:
    """Time one method in this process (meant for a fresh one): ``warmup`` frames, then ``repeat``.

    Returns the row :func:`benchmark_methods` documents, without ``ratio_to_trident``.
    """
    scale = 'tiny' if tiny else 'full'
    models = ModelsConfig(random_weights=True, model_scale=scale, device=device, bf16=bf16)
    if preset:  # the method's authors' values (its DINO, windows, ...)
        config = TridentConfig.from_mapping({'method': method, 'models': {
            'random_weights': True, 'model_scale': scale, 'device': device, 'bf16': bf16}})
    else:  # the plain defaults: each method's cost at the same settings
        config = TridentConfig(method=method, models=models)
    torch_device = resolve_device(device)
    cuda = torch_device.type == 'cuda'
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch_device)
    pipeline = TridentPipeline(config)
    vocabulary = pipeline.encode_vocabulary(', '.join(BENCH_NAMES))
    relabel_vocabulary = pipeline.encode_vocabulary(', '.join(reversed(BENCH_NAMES)))
    samples, relabels, stages = [], [], {}
    def frame() -> tuple[ImageFeatures, Segmentation]:
        features = pipeline.encode_image(image)
        return features, pipeline.label(features, vocabulary)

    for rep in range(warmup + repeat):
        seconds, (features, segmentation) = timed_call(frame, torch_device)
        relabel = time_call(partial(pipeline.label, features, relabel_vocabulary), torch_device)
        if rep >= warmup:
            samples.append(seconds)
            relabels.append(relabel)
            for name, stage_seconds in segmentation.timings.items():
                stages.setdefault(name, []).append(stage_seconds)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    values = config.flat()
    crop, stride = values[pipeline.method.crop_field], values[pipeline.method.stride_field]
    return {
        'method': method,
        'models': list(pipeline.models.loaded),
        'windows': f'{crop}/{stride}',
        'sam_refinement': pipeline.method.refines and config.refinement.refine,
        'full_frame_s': statistics.median(samples),
        'full_frame_min_s': min(samples),
        'relabel_s': statistics.median(relabels),
        'stages_s': {name: statistics.median(values) for name, values in stages.items()},
        'preset': preset,
        'peak_memory_bytes': torch.cuda.max_memory_allocated(torch_device) if cuda else peak_rss,
        'memory_measure': 'CUDA max allocated' if cuda else 'peak RSS',
        'peak_rss_bytes': peak_rss,
        'device': str(torch_device),
        'device_name': torch.cuda.get_device_name(torch_device) if cuda else cpu_name(),
        'dtype': str(pipeline.models.dtype).replace('torch.', ''),
        'model_scale': config.models.model_scale,
        'image_size': [int(image.shape[1]), int(image.shape[0])],
        'repeat': repeat,
    }


def benchmark_methods(image: np.ndarray, repeat: int = 3, warmup: int = 1, tiny: bool = False, device: str = 'auto',
                      methods: Sequence[str] | None = None, bf16: bool = False, preset: bool = False) -> list[dict]:
    """Full-frame time and peak memory of every method in ``methods``, each in a fresh process.

    Args:
        image: (H, W, 3) uint8 RGB frame.
        repeat: measured frames per method.
        warmup: unmeasured frames before them.
        tiny: small test architectures instead of the paper's.
        device: auto, cpu, cuda or cuda:N.
        methods: which methods, in this order (default: every registered one).
        bf16: bfloat16 encoders on the CPU.
        preset: each method with its authors' preset (default: the plain defaults, the same settings for all).

    Returns:
        One dict per method: ``method``, ``models`` (loaded), ``windows`` (crop/stride),
        ``sam_refinement``, ``full_frame_s`` (median), ``full_frame_min_s``, ``relabel_s`` (median: a new vocabulary
        on the cached frame), ``stages_s`` (median seconds per stage of a frame), ``preset``, ``ratio_to_trident``
        (full_frame_s / trident's; None when ``trident`` is not among ``methods``),
        ``peak_memory_bytes`` with ``memory_measure``, ``peak_rss_bytes``, ``device``,
        ``device_name``, ``dtype``, ``model_scale``, ``image_size`` [W, H], ``repeat``.
    """
    methods = method_names() if methods is None else methods
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ValueError(f'unknown methods {unknown}: choose from {", ".join(method_names())}')
    if repeat < 1 or warmup < 0:
        raise ValueError(f'repeat must be >= 1 and warmup >= 0, got {repeat}, {warmup}')
    context = multiprocessing.get_context('spawn')
    rows = []
    with context.Pool(1, maxtasksperchild=1) as pool:  # a new process per method
        for method in methods:
            rows.append(pool.apply(measure_method, (method, image, repeat, warmup, tiny, device, bf16, preset)))
    trident = next((row['full_frame_s'] for row in rows if row['method'] == 'trident'), None)
    for row in rows:
        row['ratio_to_trident'] = row['full_frame_s'] / trident if trident else None
    return rows


def format_method_table(rows: list[dict]) -> str:
    """A text table of :func:`benchmark_methods` rows, one line per method."""
    if not rows:
        return '(no methods)'
    first = rows[0]
    lines = [
        f"device: {first['device']} ({first['device_name']}), dtype {first['dtype']}, models {first['model_scale']}, "
        f"image {first['image_size'][0]}x{first['image_size'][1]}, repetitions {first['repeat']}, "
        f"memory: {first['memory_measure']} (models included)",
        '',
        f"{'method':<14}{'models':<16}{'windows':<9}{'frame ms':>10}{'min ms':>10}{'x trident':>11}"
        f"{'relabel ms':>12}{'peak memory':>14}",
    ]
    for row in rows:
        ratio = f"{row['ratio_to_trident']:.3f}" if row['ratio_to_trident'] is not None else '-'
        lines.append(f"{row['method']:<14}{'+'.join(row['models']):<16}{row['windows']:<9}"
                     f"{1000 * row['full_frame_s']:>10.1f}{1000 * row['full_frame_min_s']:>10.1f}{ratio:>11}"
                     f"{1000 * row['relabel_s']:>12.1f}{row['peak_memory_bytes'] / 2**30:>10.2f} GiB")
    lines.append('')
    for row in rows:
        lines.append(f"{row['method']:<14}stages (ms): " + ', '.join(
            f'{name} {1000 * seconds:.1f}' for name, seconds in row['stages_s'].items()))
    return '\n'.join(lines)
