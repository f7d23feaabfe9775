"""Exporting a method's graphs to ONNX into the engine cache, each file named by its key.

A graph file is ``<kind>[-<crop>]-<precision>-<weights hash>.onnx`` in ``models.engine_cache_dir`` (default: the
folder ``engines`` beside the weights), with a JSON sidecar of the same name holding the key, the inputs, outputs and
dynamic axes, and the size. The weights hash is the SHA-256 of the graph module's parameters and buffers (names,
dtypes, shapes, bytes) and the graph code version, so other weights, another crop or another precision never reuse a
file, and an existing file is reused without exporting again. Export uses the TorchScript exporter
(``dynamo=False``, opset 17), which writes the same graphs on torch 2.3 and 2.14, then onnxslim where it is
installed (constant folding and dead-node removal: exact; the parity tests run the simplified graphs).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from trident_ros.models.weights import ModelSettings, weights_dir
from trident_ros.runtime.graphs import OPSET, build_graph, example_inputs, export_mode, spec, upstream_blocks

logger = logging.getLogger(__name__)

GRAPH_VERSION = 1
"""Raised when a graph module changes what it computes: part of every key, so old files are not reused."""
TORCHSCRIPT_EXPORTER = {'dynamo': False} if 'dynamo' in inspect.signature(torch.onnx.export).parameters else {}
"""The TorchScript exporter: torch >= 2.9 defaults to the dynamo one (``dynamo=True``); torch 2.3 has only it."""
PRECISIONS = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16'}


@dataclass(frozen=True)
class GraphKey:
    """What decides a graph file: its kind, the window crop it bakes (0: none), precision and weights hash."""

    kind: str
    crop: int
    precision: str
    weights: str

    @property
    def file_name(self) -> str:
        """``<kind>[-<crop>]-<precision>-<weights hash, 16 hex>.onnx``."""
        crop = f'-{self.crop}' if self.crop else ''
        return f'{self.kind}{crop}-{self.precision}-{self.weights[:16]}.onnx'


def weights_hash(module: nn.Module, shapes: str = '') -> str:
    """SHA-256 (hex) of a module's parameters and buffers (names, dtypes, shapes, bytes), :data:`GRAPH_VERSION` and
    ``shapes`` (the example inputs' shapes: e.g. the DINO grid a ``clip_guided`` graph attends on).
    """
    digest = hashlib.sha256(f'graph-version-{GRAPH_VERSION};{shapes}'.encode())
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        digest.update(f'{name}:{tensor.dtype}:{tuple(tensor.shape)}'.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def engine_cache_dir(config: ModelSettings) -> Path:
    """``models.engine_cache_dir``, else the folder ``engines`` in the weights folder."""
    name = config.models.engine_cache_dir
    return Path(name).expanduser() if name else weights_dir(config) / 'engines'


def export_graph(kind: str, models: object, crop: int, cache_dir: Path) -> Path:
    """Export graph ``kind`` of loaded models into ``cache_dir`` (reused when its key's file exists).

    Args:
        kind: a graph kind (:data:`trident_ros.runtime.graphs.SPECS`, ``clip_rule_<method>``).
        models: the loaded :class:`~trident_ros.models.TridentModels`.
        crop: the window crop the graph bakes (0 for the SAM graphs).
        cache_dir: the engine cache folder (created).

    Returns:
        The ``.onnx`` file.
    """
    module = build_graph(kind, models, crop).eval()
    inputs = example_inputs(kind, models, crop)
    shapes = ';'.join(str(tuple(tensor.shape)) for tensor in inputs)
    key = GraphKey(kind, crop, PRECISIONS.get(models.dtype, str(models.dtype)), weights_hash(module, shapes))
    path = cache_dir / key.file_name
    if path.exists():
        logger.info('graph %s: %s (cached)', kind, path)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    graph_spec = spec(kind)
    start = time.perf_counter()
    handle, scratch = tempfile.mkstemp(suffix='.onnx', dir=cache_dir)
    os.close(handle)
    try:
        blocks = upstream_blocks(models.sam.model.image_encoder) if models.sam is not None else nullcontext()
        with export_mode(), blocks, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the tracer's warnings on Python values of static shapes
            torch.onnx.export(module, inputs, scratch, opset_version=OPSET, **TORCHSCRIPT_EXPORTER,
                              input_names=list(graph_spec.inputs),
                              output_names=list(graph_spec.outputs),
                              dynamic_axes={name: {0: axis} for name, axis in graph_spec.dynamic.items()})
        slimmed = _slim(scratch)
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    sidecar = {**asdict(key), 'inputs': list(graph_spec.inputs), 'outputs': list(graph_spec.outputs),
               'dynamic_axes': graph_spec.dynamic, 'opset': OPSET, 'onnxslim': slimmed, 'bytes': size,
               'torch': torch.__version__, 'export_seconds': round(seconds, 2)}
    path.with_suffix('.json').write_text(json.dumps(sidecar, indent=1), encoding='utf-8')
    logger.info('graph %s exported in %.1f s: %s (%.1f MiB%s)', kind, seconds, path, size / 2**20,
                ', onnxslim' if slimmed else '')
    return path


def _slim(path: str) -> bool:
    """Simplify an ONNX file in place with onnxslim; False when onnxslim is missing or fails (file unchanged)."""
    try:
        import onnxslim
    except ImportError:
        return False
    try:
        import onnx

        model = onnxslim.slim(onnx.load(path))
        onnx.save(model, path)
        return True
    except Exception as error:  # onnxslim raises many types on a graph it cannot handle
        logger.info('onnxslim left %s as exported: %s: %s', path, type(error).__name__, error)
        return False
