"""``trident-export`` (``ros2 run trident_ros export_models``): the configured method's encoder graphs to ONNX.

Exports every graph the method runs under the configuration (:meth:`~trident_ros.methods.base.Method.graphs`) into
the engine cache (``models.engine_cache_dir``, default ``engines`` in the weights folder), named by their key (weights
hash, graph kind, crop, precision); a graph already there is kept. Export runs on any machine, a CPU included. With
``--build`` it also opens them with ``models.ort_providers`` as the node does, so TensorRT builds its engines on this
machine (run it on the target). Prints one line per graph: file, size, inputs, outputs, dynamic axes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trident_ros import methods
from trident_ros.config import ConfigError, TridentConfig
from trident_ros.models import load_models
from trident_ros.runtime.export import engine_cache_dir, export_graph
from trident_ros.runtime.graphs import spec
from trident_ros.runtime.onnx_runtime import load_graphs
from trident_ros.tools.segment import config_from


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='trident-export', description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', type=Path, help='YAML config (nested sections and/or dotted names)')
    parser.add_argument('--method', help='a registered method (overrides the config)')
    parser.add_argument('--device', help='auto, cpu, cuda or cuda:N (overrides the config)')
    parser.add_argument('--engine-cache-dir', help='where the graphs go (default: weights_dir/engines)')
    parser.add_argument('--build', action='store_true',
                        help='also open the graphs with models.ort_providers (TensorRT builds its engines here)')
    parser.add_argument('--random-weights', action='store_true',
                        help='SMOKE TEST: random weights, no files needed')
    parser.add_argument('--tiny', action='store_true',
                        help='with --random-weights: small test architectures (seconds on a CPU)')
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> TridentConfig:
    """The file's names, then the options (the method's preset fills in what neither gives)."""
    changes: dict[str, object] = {}
    for option, name in (('method', 'method'), ('device', 'models.device'),
                         ('engine_cache_dir', 'models.engine_cache_dir')):
        if getattr(args, option):
            changes[name] = getattr(args, option)
    return config_from(args, changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] %(name)s: %(message)s')
    try:
        config = build_config(args)
    except ConfigError as error:
        print(f'trident-export: {error}', file=sys.stderr)
        return 2
    method = methods.get(config.method)
    graphs = method.graphs(config)
    if not graphs:
        print(f'method {config.method} exports no graph under this configuration: it runs on torch')
        return 0
    models = load_models(config)
    cache_dir = engine_cache_dir(config)
    for kind, crop in graphs:
        path = export_graph(kind, models, crop, cache_dir)
        graph_spec = spec(kind)
        print(f'{kind}: {path} ({path.stat().st_size / 2**20:.1f} MiB); inputs {", ".join(graph_spec.inputs)}; '
              f'outputs {", ".join(graph_spec.outputs)}; dynamic axes '
              f'{", ".join(f"{name}[0]={axis}" for name, axis in graph_spec.dynamic.items()) or "none"}')
    if args.build:
        load_graphs(config, method, models)
    return 0


if __name__ == '__main__':
    sys.exit(main())
