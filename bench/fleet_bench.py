#!/usr/bin/env python3
"""The same bags labelled in this process and on a local Ray instance with 1 and 2 workers; Ray's own costs.

    source tools/env.sh
    flock /tmp/trident-heavy.lock python bench/fleet_bench.py                 # 4 bags x 8 frames, 2 per shard
    flock /tmp/trident-heavy.lock python bench/fleet_bench.py --bags 2 --frames 4 --checkpoint 1

Writes ``--bags`` bags of ``--frames`` 160x120 frames (sqlite3, raw images) into a temporary folder and
labels them with tiny random-weight models (``--method``, default trident):

- ``here``: :func:`label_bags` in this process (the torch default thread count), pipeline load included;
- ``ray.init`` / ``ray.shutdown``: a private instance with ``--cpus`` CPUs, no dashboard;
- ``first shard``: a job of one bag of one frame on Ray (plan task, actor start, pipeline load, one
  shard, merge): the fixed cost of a job;
- ``ray 1 worker`` / ``ray 2 workers``: the whole set (1-CPU workers, so one thread each), job included.

Each row gives the wall time, the labelling seconds the shards report (decode, model, write: the
work), and the rest per shard, (wall x workers - work) / shards: Ray's scheduling, actor starts and
the part and merge files, spread over the shards. It prints the ratio of 1 to 2 workers. Run it
under the heavy-job lock: other jobs on the machine change every number.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'test' / 'core')]  # this tree's package, the tests' bag writer

from test_bag_labelling import TOPIC, VOCABULARY, make_bag  # noqa: E402

from trident_ros.config import TridentConfig  # noqa: E402
from trident_ros.tools.bags import BagOptions  # noqa: E402
from trident_ros.tools.fleet import RaySettings, label_bags  # noqa: E402


def run(label: str, sources: list[Path], output: Path, options: BagOptions, config: TridentConfig, checkpoint: int,
        workers: int | None) -> tuple[str, float, float, int, int, int]:
    """(label, wall s, labelling s, frames, shards, workers) of one job."""
    ray = RaySettings(address='auto', workers=(workers, workers)) if workers else None
    began = time.monotonic()
    result = label_bags(sources, output, options, config, ray=ray, checkpoint=checkpoint)
    wall = time.monotonic() - began
    assert not result.errors and all(bag.complete for bag in result.bags.values()), result
    shards = sum(-(-bag.selected // checkpoint) for bag in result.bags.values())
    frames = sum(bag.labelled for bag in result.bags.values())
    return label, wall, sum(bag.seconds for bag in result.bags.values()), frames, shards, workers or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--bags', type=int, default=4)
    parser.add_argument('--frames', type=int, default=8)
    parser.add_argument('--checkpoint', type=int, default=2, help='frames per shard')
    parser.add_argument('--cpus', type=int, default=2, help="the Ray instance's CPUs")
    parser.add_argument('--method', default='trident')
    args = parser.parse_args()
    os.environ.setdefault('RAY_AUTH_MODE', 'disabled')
    import ray

    config = TridentConfig.from_mapping({'models.random_weights': True, 'models.model_scale': 'tiny',
                                         'method': args.method})
    options = BagOptions(topic=TOPIC, vocabulary=VOCABULARY)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for i in range(args.bags):
            make_bag(root / 'bags' / f'run{i}', 'sqlite3', False, args.frames)
        one = make_bag(root / 'one' / 'run', 'sqlite3', False, 1)
        rows = [run('here (no Ray)', [root / 'bags'], root / 'here', options, config, args.checkpoint, None)]
        began = time.monotonic()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        started = time.monotonic() - began
        rows.append(run('first shard (1 frame)', [one], root / 'one_out', options, config, args.checkpoint, 1))
        for workers in (1, 2):
            rows.append(run(f'ray {workers} worker(s)', [root / 'bags'], root / f'ray{workers}', options, config,
                            args.checkpoint, workers))
        began = time.monotonic()
        ray.shutdown()
        stopped = time.monotonic() - began
    print(f'{args.bags} bags x {args.frames} frames, {args.checkpoint} per shard, method {args.method} (tiny, random '
          f'weights), {os.cpu_count()} CPUs')
    print(f'ray.init {started:.2f} s, ray.shutdown {stopped:.2f} s')
    print(f'{"run":24} {"wall s":>8} {"work s":>8} {"shards":>7} {"s/frame":>8} {"rest s/shard":>13}')
    for label, wall, work, frames, shards, workers in rows:
        rest = (wall * workers - work) / shards
        print(f'{label:24} {wall:8.2f} {work:8.2f} {shards:7d} {wall / frames:8.3f} {rest:13.3f}')
    print(f'wall of 1 worker / 2 workers: {rows[2][1] / rows[3][1]:.2f}x')


if __name__ == '__main__':
    main()
