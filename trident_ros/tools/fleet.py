"""Many bags at once: :func:`label_bags` in this process, or on a Ray cluster (``trident-segment --ray``).

On Ray (the ``fleet`` extra, imported only here and only when asked for): ``from_items(bags)`` ->
``flat_map(plan)`` (CPU tasks that read each bag's selection) -> ``map_batches(ShardLabeller)``
(an actor pool: each actor loads the pipeline once and labels one shard at a time, writing and
publishing its part itself) -> the driver, which takes the small result rows (progress, merges,
manifest). Frames never enter Ray's object store: the bags and the output are on one filesystem
that every node mounts at the same path. Ray retries a shard whose worker or node died; the
parts' atomic publishing (:mod:`.shards`) keeps each frame once in the output.

A worker's output equals a single-process run's on the same device, software and thread count:
Ray gives an actor ``OMP_NUM_THREADS`` = its ``num_cpus`` (at least 1) unless the environment sets it.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trident_ros.config import TridentConfig
from trident_ros.errors import ConfigError
from trident_ros.tools.bags import BagOptions
from trident_ros.tools.shards import (
    BagPlan,
    FleetResult,
    Job,
    Shard,
    ShardResult,
    label_shard,
    plan_bag,
)

if TYPE_CHECKING:
    from trident_ros.pipeline import TridentPipeline
    from trident_ros.vocabulary import Vocabulary

logger = logging.getLogger('trident_ros.tools.fleet')

INSTALL_HINT = "pip install 'trident_ros[fleet]'"


@dataclass
class RaySettings:
    """Where and how wide a job runs on Ray.

    Attributes:
        address: ``auto`` (``RAY_ADDRESS``, else the cluster of a local ``ray start``), ``local`` (a
            private instance on this machine) or a cluster's address (``head:6379``, ``ray://head:10001``).
        workers: (min, max) actors, each with its own pipeline; max None: as many as the cluster's
            GPUs (CPUs without GPUs) allow.
        gpus_per_worker: GPUs per actor (0.5: two actors share a GPU); None: 1 where the cluster has GPUs, else 0.
        cpus_per_worker: CPUs per actor (also its thread count).
        verbose: Ray Data's progress bars and the workers' logs on this terminal.
    """

    address: str = 'auto'
    workers: tuple[int, int | None] = (1, None)
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    verbose: bool = False


def job_settings(options: BagOptions, checkpoint: int, config: dict) -> dict:
    """What a resumed job must share with the earlier one: the selection and outputs, the shard size, the
    pipeline's configuration (``TridentConfig.flat()``), as JSON values.
    """
    return json.loads(json.dumps({'options': asdict(options), 'checkpoint': checkpoint, 'config': config}))


def find_bags(inputs: list[Path]) -> list[tuple[Path, str]]:
    """(bag, output path) for every rosbag2 bag among ``inputs`` (bags, or folders searched for bags).

    A bag given itself is written under its name, a bag found in a folder under its path relative to it.

    Raises:
        ConfigError: an input that is neither, a folder without bags, or two bags with one output path.
    """
    found: list[tuple[Path, str]] = []
    for path in inputs:
        if (path / 'metadata.yaml').is_file():
            found.append((path, path.resolve().name))
        elif path.is_dir():
            bags = sorted(meta.parent for meta in path.rglob('metadata.yaml'))
            bags = [bag for bag in bags if not any(other in bag.parents for other in bags)]
            if not bags:
                raise ConfigError(f'{path} holds no rosbag2 bag (a folder with metadata.yaml)')
            found += [(bag, bag.relative_to(path).as_posix()) for bag in bags]
        else:
            raise ConfigError(f'{path} is not a rosbag2 bag nor a folder of bags')
    names = [name for _, name in found]
    for name in {name for name in names if names.count(name) > 1}:
        raise ConfigError(f'two inputs would both be written to {name}: pass them in separate runs')
    return found


def label_bags(sources: list[Path], output: Path, options: BagOptions, config: TridentConfig, *,
               ray: RaySettings | None = None, checkpoint: int = 50, resume: bool = False,
               png_dir: Path | None = None) -> FleetResult:
    """Label ``options.topic`` of every bag among ``sources`` into ``output/<bag path>/``.

    Args:
        sources: bags, or folders searched for bags (:func:`find_bags`).
        output: the job's folder: the labelled bags and ``trident-fleet.json``.
        options: as for :func:`bags.label_bag`.
        config: the pipeline's configuration (loaded once per worker).
        ray: run on Ray; None: the bags one after another in this process.
        checkpoint: selected frames per shard (at most this many are redone per worker that died).
        resume: continue the job in ``output``: published shards and finished bags are not redone.
        png_dir: also write overlay and label PNGs into ``png_dir/<bag path>/``.

    Returns:
        Each bag's counts, the failed bags' errors, and whether the job was interrupted.

    Raises:
        ConfigError: no bag, an output holding another job, bad worker settings, Ray missing or no cluster.
    """
    if checkpoint < 1:
        raise ConfigError(f'--checkpoint {checkpoint}: must be >= 1')
    if options.every < 1:
        raise ConfigError(f'--every {options.every}: must be >= 1')
    bags = find_bags(sources)
    settings = job_settings(options, checkpoint, config.flat())
    if ray is None:
        job = Job(output, bags, options, settings, resume)
        from trident_ros.pipeline import TridentPipeline

        pipeline = TridentPipeline(config)
        job.write_manifest()  # once the pipeline loaded: a configuration that cannot load leaves nothing
        try:
            _label_here(job, pipeline, pipeline.encode_vocabulary(options.vocabulary), checkpoint, png_dir)
        except KeyboardInterrupt:
            return job.finish(interrupted=True)
        return job.finish()
    return _label_on_ray(lambda: Job(output, bags, options, settings, resume), config, checkpoint, png_dir, ray)


def _label_here(job: Job, pipeline: TridentPipeline, vocabulary: Vocabulary, checkpoint: int,
                png_dir: Path | None = None) -> None:
    """Label the job's bags one after another in this process (the same shards as on a cluster)."""
    for bag, name in job.todo():
        plan = plan_bag(bag, name, job.options, checkpoint, job.output)
        job.add_plan(plan)
        for shard in plan.shards:
            job.add_shard(label_shard(pipeline, vocabulary, shard, job.options, job.output, png_dir))


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise ConfigError(f'--ray needs Ray Data, which is not installed ({error}): {INSTALL_HINT}') from error
    return ray


def _plan_rows(row: dict, options: BagOptions, checkpoint: int, output: str) -> list[dict]:
    """Ray Data ``flat_map``: a bag -> its plan row, then one row per shard still to label."""
    plan = plan_bag(row['bag'], row['name'], options, checkpoint, Path(output))
    shards, plan.shards = plan.shards, []
    return [{'kind': 'plan', 'data': json.dumps(asdict(plan))}] + [
        {'kind': 'shard', 'data': json.dumps(asdict(shard))} for shard in shards]


class ShardLabeller:
    """Ray Data ``map_batches`` callable class: one actor, one pipeline, one shard per call (batch_size=1)."""

    def __init__(self, config: TridentConfig, options: BagOptions, output: str, png_dir: str | None) -> None:
        from trident_ros.pipeline import TridentPipeline

        self.pipeline = TridentPipeline(config)
        self.vocabulary = self.pipeline.encode_vocabulary(options.vocabulary)
        self.options, self.output = options, Path(output)
        self.png_dir = Path(png_dir) if png_dir else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Label the shard rows of ``batch`` (plan rows pass through); a shard's failure is its row's error."""
        import ray

        node = ray.get_runtime_context().get_node_id()[:8]
        data = []
        for kind, text in zip(batch['kind'], batch['data'], strict=True):
            if kind == 'shard':
                fields = json.loads(text)
                shard = Shard(**{**fields, 'times': tuple(fields['times'])})
                try:
                    result = label_shard(self.pipeline, self.vocabulary, shard, self.options, self.output,
                                         self.png_dir)
                except Exception as error:  # noqa: BLE001 - one shard's failure fails its bag, not the job
                    result = ShardResult(name=shard.name, index=shard.index,
                                         error=f'{shard.bag}: shard {shard.index}: {type(error).__name__}: {error}')
                result.node = node
                text = json.dumps(asdict(result))
            data.append(text)
        return {'kind': list(batch['kind']), 'data': data}


def _connect(ray: Any, settings: RaySettings) -> bool:
    """Join or start the cluster; True when this call did (and shuts it down after)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=settings.address, include_dashboard=False if settings.address == 'local' else None,
                 log_to_driver=settings.verbose, logging_level=logging.INFO if settings.verbose else logging.WARNING)
    except ConnectionError as error:
        raise ConfigError(f'--ray {settings.address}: no Ray cluster found ({error}); start one with `ray start '
                          f'--head`, pass its address, or use --ray local') from error
    return True


def _pool(ray: Any, settings: RaySettings) -> tuple[int, int, float]:
    """(min, max) actors and GPUs per actor, checked against the cluster."""
    resources = ray.cluster_resources()
    gpus = settings.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if resources.get('GPU', 0) else 0.0
    if gpus < 0 or settings.cpus_per_worker <= 0:
        raise ConfigError(f'--gpus-per-worker {gpus} and --cpus-per-worker {settings.cpus_per_worker}: '
                          f'must be >= 0 and > 0')
    fits = int(resources.get('GPU', 0) // gpus) if gpus else int(resources.get('CPU', 0) // settings.cpus_per_worker)
    low, high = settings.workers
    high = high if high is not None else max(low, fits)
    if low < 1 or high < low:
        raise ConfigError(f'--workers {low}:{high}: needs 1 <= min <= max')
    if fits < low:
        raise ConfigError(f'the cluster ({resources.get("CPU", 0):g} CPUs, {resources.get("GPU", 0):g} GPUs) fits '
                          f'{fits} worker(s) of {settings.cpus_per_worker:g} CPU(s) and {gpus:g} GPU(s); '
                          f'--workers asks for at least {low}')
    return low, high, gpus


def _label_on_ray(new_job: Callable[[], Job], config: TridentConfig, checkpoint: int, png_dir: Path | None,
                  settings: RaySettings) -> FleetResult:
    """Connect, check the pool, then start the job (nothing is written before the configuration holds)."""
    ray = _import_ray()
    if not settings.verbose:
        logging.getLogger('ray.data').setLevel(logging.WARNING)
    started = _connect(ray, settings)
    previous = None
    if threading.current_thread() is threading.main_thread():  # ray.init replaced it: SIGTERM stops as Ctrl-C
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        low, high, gpus = _pool(ray, settings)
        job = new_job()
        job.write_manifest()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = settings.verbose
        context.target_max_block_size = 1  # one row a block: each shard its own task, to whichever actor is free
        context.max_consecutive_actor_init_deaths = 2 * high + 2  # a node lost while loading is not the end
        output = str(job.output.resolve())
        dataset = ray.data.from_items([{'bag': bag, 'name': name} for bag, name in job.todo()])
        dataset = dataset.flat_map(_plan_rows, num_cpus=0,  # reading only: it must not wait for the actors' CPUs
                                   fn_kwargs={'options': job.options, 'checkpoint': checkpoint, 'output': output})
        dataset = dataset.map_batches(
            ShardLabeller, batch_size=1, num_cpus=settings.cpus_per_worker, num_gpus=gpus or None,
            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs={'config': config, 'options': job.options, 'output': output,
                                   'png_dir': str(png_dir.resolve()) if png_dir else None})
        logger.info('labelling %d bag(s) on Ray with %d to %d worker(s) of %g CPU(s), %g GPU(s)',
                    len(job.todo()), low, high, settings.cpus_per_worker, gpus)
        try:
            for row in dataset.iter_rows():
                fields = json.loads(row['data'])
                if row['kind'] == 'plan':
                    job.add_plan(BagPlan(**fields))
                else:
                    job.add_shard(ShardResult(**fields))
        except KeyboardInterrupt:
            return job.finish(interrupted=True)
        except Exception as error:  # noqa: BLE001 - Ray's errors (a UDF that cannot start...): the bags left fail
            logger.error('the Ray job failed: %s: %s', type(error).__name__, error)
        return job.finish()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if started:
            ray.shutdown()
