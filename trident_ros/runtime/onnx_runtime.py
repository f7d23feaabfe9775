"""``models.backend: onnxruntime``: a method's exported graphs run by ONNX Runtime, the rest stays torch.

:func:`load_graphs` exports what is missing (:mod:`trident_ros.runtime.export`) and opens one ONNX Runtime session
per graph with the providers of ``models.ort_providers`` (``tensorrt,cuda,cpu`` by default; those this
onnxruntime lacks are dropped with one INFO line). With the TensorRT provider its fp16 mode follows
``models.fp16``, and its engine and timing caches live in ``<engine_cache_dir>/tensorrt/<TensorRT version>-<GPU>``;
a cache written by another stack (onnxruntime, CUDA, GPU compute capability) is removed with a WARN and rebuilt, never
used silently. With TensorRT or CUDA each session runs once at load, so engines are built before the first frame,
each step reported to ``progress``. With the CPU provider alone, ONNX Runtime's CPU memory arena and memory
patterns are off: they keep the peak of every graph allocated (13 GiB of RSS for trident at full size).

A method's stages ask :meth:`OnnxGraphs.has` for their graph at their crop; a stage without one runs on torch, said
once in an INFO line.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trident_ros.runtime.export import engine_cache_dir, export_graph
from trident_ros.runtime.graphs import example_inputs, spec

logger = logging.getLogger(__name__)

PROVIDERS = {'tensorrt': 'TensorrtExecutionProvider', 'cuda': 'CUDAExecutionProvider', 'cpu': 'CPUExecutionProvider'}
"""``models.ort_providers`` names -> ONNX Runtime's execution providers."""
STACK_FILE = 'stack.json'
"""The TensorRT cache folder's record of the stack that wrote it."""
_TORCH_DTYPES = {'tensor(float)': torch.float32, 'tensor(float16)': torch.float16, 'tensor(bfloat16)': torch.bfloat16}


def parse_providers(names: str) -> list[str]:
    """``'tensorrt,cuda,cpu'`` -> ONNX Runtime provider names, in order.

    Raises:
        ValueError: an unknown name, or none.
    """
    wanted = [name.strip() for name in names.split(',') if name.strip()]
    unknown = [name for name in wanted if name not in PROVIDERS]
    if unknown or not wanted:
        raise ValueError(f'ort_providers={names!r}: a comma-separated list of {", ".join(PROVIDERS)}')
    return [PROVIDERS[name] for name in wanted]


def available_providers(names: str, available: list[str]) -> list[str]:
    """The providers of ``names`` that ``available`` lists (one INFO line for those dropped); CPU when none."""
    wanted = parse_providers(names)
    kept = [name for name in wanted if name in available]
    dropped = [name for name in wanted if name not in available]
    if dropped:
        logger.info('onnxruntime has no %s here (it has %s): using %s', ', '.join(dropped), ', '.join(available),
                    ', '.join(kept) or 'CPUExecutionProvider')
    return kept or [PROVIDERS['cpu']]


def gpu_stack(device: torch.device) -> dict[str, str]:
    """What a TensorRT engine is bound to: TensorRT, onnxruntime, CUDA, the GPU and its compute capability."""
    import onnxruntime

    try:
        import tensorrt
        trt_version = tensorrt.__version__
    except ImportError:
        trt_version = 'unknown'
    gpu, capability = 'none', ''
    if device.type == 'cuda' and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
        capability = '.'.join(map(str, torch.cuda.get_device_capability(device)))
    return {'tensorrt': trt_version, 'onnxruntime': onnxruntime.__version__, 'cuda': str(torch.version.cuda),
            'gpu': gpu, 'capability': capability}


def tensorrt_cache_dir(cache_dir: Path, stack: Mapping[str, str]) -> Path:
    """``<cache_dir>/tensorrt/<TensorRT version>-<GPU name>``: engines bind to both."""
    slug = re.sub(r'[^A-Za-z0-9.-]+', '_', f'{stack["tensorrt"]}-{stack["gpu"]}').strip('_')
    return cache_dir / 'tensorrt' / slug


def stale_reason(recorded: Mapping[str, str], current: Mapping[str, str]) -> str | None:
    """Why engines written under ``recorded`` cannot serve ``current`` (the differing entries), or None."""
    changed = [f'{name} {recorded.get(name)!r} -> {value!r}' for name, value in current.items()
               if recorded.get(name) != value]
    return '; '.join(changed) or None


def prepare_tensorrt_cache(folder: Path, stack: Mapping[str, str]) -> bool:
    """Make ``folder`` hold only engines of ``stack``: a cache another stack wrote is removed (WARN).

    Returns:
        True when a stale cache was removed.
    """
    record = folder / STACK_FILE
    stale = False
    if folder.exists():
        try:
            recorded = json.loads(record.read_text(encoding='utf-8'))
        except (OSError, ValueError):
            recorded = {}
        reason = stale_reason(recorded, stack)
        if reason is not None and any(folder.iterdir()):
            logger.warning('TensorRT engine cache %s was built for another stack (%s): removed, engines are rebuilt',
                           folder, reason)
            shutil.rmtree(folder)
            stale = True
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(dict(stack), indent=1), encoding='utf-8')
    return stale


def provider_options(providers: list[str], folder: Path | None, fp16: bool,
                     device: torch.device) -> list[dict[str, Any]]:
    """Per provider its options: TensorRT fp16 and caches in ``folder``, CUDA the device index."""
    options: list[dict[str, Any]] = []
    for name in providers:
        if name == PROVIDERS['tensorrt']:
            options.append({'trt_fp16_enable': fp16, 'trt_engine_cache_enable': True,
                            'trt_engine_cache_path': str(folder), 'trt_timing_cache_enable': True,
                            'trt_timing_cache_path': str(folder)})
        elif name == PROVIDERS['cuda']:
            options.append({'device_id': device.index or 0})
        else:
            options.append({})
    return options


class OnnxGraphs:
    """Open ONNX Runtime sessions of a method's graphs, each for one crop (0: none)."""

    def __init__(self, sessions: Mapping[str, tuple[int, Any]], device: torch.device) -> None:
        self.sessions = dict(sessions)
        self.device = device
        self._said: set[tuple[str, int]] = set()

    def has(self, kind: str, crop: int = 0) -> bool:
        """Whether graph ``kind`` runs at ``crop``; the first miss of each (kind, crop) says so in an INFO line."""
        held = self.sessions.get(kind)
        if held is not None and held[0] == crop:
            return True
        if (kind, crop) not in self._said:
            self._said.add((kind, crop))
            why = 'not exported' if held is None else f'exported for crop {held[0]}, not {crop}'
            logger.info('graph %s %s: that stage runs on torch', kind, why)
        return False

    def run(self, kind: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run graph ``kind`` on its inputs (in :func:`~trident_ros.runtime.graphs.spec` order): its outputs on the
        models' device.
        """
        session = self.sessions[kind][1]
        given = dict(zip(spec(kind).inputs, inputs, strict=True))
        feeds = {meta.name: given[meta.name].detach().to('cpu', _TORCH_DTYPES.get(meta.type, torch.float32))
                 .contiguous().numpy() for meta in session.get_inputs()}
        return [torch.from_numpy(np.ascontiguousarray(out)).to(self.device) for out in session.run(None, feeds)]


def load_graphs(config: Any, method: Any, models: Any,
                progress: Callable[[str], None] | None = None) -> OnnxGraphs:
    """Export (if needed) and open the graphs of ``method``; stages without one stay torch (INFO).

    Args:
        config: the :class:`~trident_ros.config.TridentConfig`.
        method: the registered method.
        models: the loaded models.
        progress: told each step (``exporting sam_fused (3/4)``, ``building ...``), e.g. the node's diagnostics.

    Returns:
        The open sessions.
    """
    import onnxruntime

    def report(message: str) -> None:
        logger.info(message)
        if progress is not None:
            progress(message)

    graphs = dict(method.graphs(config))
    if not graphs:
        logger.info('method %s has no exported graphs under this configuration: it runs on torch', method.name)
        return OnnxGraphs({}, models.device)
    providers = available_providers(config.models.ort_providers, onnxruntime.get_available_providers())
    cache_dir = engine_cache_dir(config)
    folder = None
    if PROVIDERS['tensorrt'] in providers:
        stack = gpu_stack(models.device)
        folder = tensorrt_cache_dir(cache_dir, stack)
        prepare_tensorrt_cache(folder, stack)
    options = provider_options(providers, folder, config.models.fp16, models.device)
    accelerated = providers[0] != PROVIDERS['cpu']
    session_options = onnxruntime.SessionOptions()
    if not accelerated:  # SAM's graph: 13 GiB peak RSS with the CPU arena and memory patterns, far less without
        session_options.enable_cpu_mem_arena = False
        session_options.enable_mem_pattern = False
    sessions = {}
    for index, (kind, crop) in enumerate(graphs.items(), start=1):
        report(f'exporting {kind} ({index}/{len(graphs)})')
        path = export_graph(kind, models, crop, cache_dir)
        report(f'building {kind} ({index}/{len(graphs)}) with {", ".join(providers)}')
        start = time.perf_counter()
        session = onnxruntime.InferenceSession(str(path), session_options, providers=providers,
                                               provider_options=options)
        sessions[kind] = (crop, session)
        if accelerated:  # TensorRT builds its engines at the first run
            OnnxGraphs(sessions, models.device).run(kind, *example_inputs(kind, models, crop, batch=1))
        logger.info('graph %s ready in %.1f s (%s)', kind, time.perf_counter() - start,
                    ', '.join(session.get_providers()))
    report(f'graphs ready: {", ".join(graphs)}')
    return OnnxGraphs(sessions, models.device)
