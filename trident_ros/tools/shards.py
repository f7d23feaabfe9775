"""Many bags in shards: planning, labelling a shard, publishing it once, merging a bag, the job's manifest.

A *shard* is one bag plus a run of consecutive selected frames (``checkpoint`` of them, the last one
shorter). The plan repeats :func:`bags.label_bag`'s selection, so shards are disjoint, stable
across runs and, read in index order, the single-process order. Every attempt at a shard writes a
private folder ``<output>/<bag>.parts/.tmp_<index>_<uuid>/`` (its ``pid``, a part bag, the counts)
and publishes it by renaming it to ``shard_<index>``: a rename onto an existing non-empty folder
fails, so the first publisher wins and a duplicate discards its copy. One merge per bag joins the
published parts in shard order into ``<output>/<bag>/`` (:func:`bags.merge_parts`), which then
holds what ``trident-segment <bag> --topic ...`` writes alone. :class:`Job` is the driver's side:
plans and shard results in any order, the merges, the manifest ``trident-fleet.json``.

Nothing here imports Ray: :mod:`.fleet` runs these functions on a cluster or in its own process.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from trident_ros.errors import ConfigError
from trident_ros.tools.bag_messages import make_typestore
from trident_ros.tools.bags import (
    BagError,
    BagOptions,
    BagResult,
    Parts,
    bag_info,
    bag_settings,
    label_frame,
    merge_parts,
    open_topic,
    parts_dir,
    selected_messages,
)

if TYPE_CHECKING:
    from trident_ros.pipeline import TridentPipeline
    from trident_ros.vocabulary import Vocabulary

logger = logging.getLogger('trident_ros.tools.shards')

MANIFEST = 'trident-fleet.json'
MAX_ATTEMPTS = 4
"""Attempts at one shard (each leaves its folder when its process dies) before the shard fails its bag."""


@dataclass(frozen=True)
class Shard:
    """One bag and a run of consecutive selected frames.

    Attributes:
        bag: the input bag (a rosbag2 folder).
        name: the bag's output path under the job's output folder.
        index: the shard's place in the bag (0, 1, ...).
        times: the selected frames' bag times (ns), increasing.
    """

    bag: str
    name: str
    index: int
    times: tuple[int, ...]


@dataclass
class BagPlan:
    """A bag's shards, and where its selection stopped.

    Attributes:
        bag: the input bag.
        name: its output path under the job's output folder.
        shards: the shards still to label (a published one is left out).
        published: indices of the shards already published when the bag was planned.
        count: shards in the whole plan.
        selected: frames selected (read so far).
        error: why the bag's read stopped early (it then fails, with the frames before in its output).
    """

    bag: str
    name: str
    shards: list[Shard] = field(default_factory=list)
    published: list[int] = field(default_factory=list)
    count: int = 0
    selected: int = 0
    error: str | None = None


@dataclass
class ShardResult:
    """What one attempt at a shard did.

    Attributes:
        name: the bag's output path.
        index: the shard.
        labelled: frames labelled (in the published part).
        refused: frames whose image could not be decoded.
        seconds: time spent labelling.
        node, pid: the host (on Ray: the node) and the process that labelled it.
        duplicate: another attempt had published the shard first (this one was discarded).
        error: why the shard failed (it then fails its bag).
    """

    name: str
    index: int
    labelled: int = 0
    refused: int = 0
    seconds: float = 0.0
    node: str = ''
    pid: int = 0
    duplicate: bool = False
    error: str | None = None


@dataclass
class FleetResult:
    """What a job did, per bag (by output path).

    Attributes:
        output: the job's output folder.
        bags: each bag's :class:`BagResult` (``complete`` when its whole selection is in its output).
        errors: each failed bag's error.
        interrupted: the job was stopped (Ctrl-C/SIGTERM); published shards are kept for ``resume``.
    """

    output: Path
    bags: dict[str, BagResult] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False


def plan_bag(bag: str, name: str, options: BagOptions, checkpoint: int, output: Path) -> BagPlan:
    """The shards of ``bag`` (``checkpoint`` selected frames each) not yet published under ``output``.

    A read error ends the plan where :func:`bags.label_bag` stops and is kept in ``error``; a bag
    that cannot be opened has no shard.
    """
    plan = BagPlan(bag=bag, name=name)
    published = {int(folder.name.removeprefix('shard_')) for folder in parts_dir(output / name).glob('shard_*')}
    times: list[int] = []

    def cut() -> None:
        if times:
            if plan.count in published:
                plan.published.append(plan.count)
            else:
                plan.shards.append(Shard(bag, name, plan.count, tuple(times)))
            plan.count += 1
            times.clear()

    try:
        reader, connections, _ = open_topic(Path(bag), options)
    except BagError as error:
        plan.error = str(error)
        return plan
    try:
        for _, timestamp, _ in selected_messages(reader, connections, options):
            plan.selected += 1
            times.append(timestamp)
            if len(times) == checkpoint:
                cut()
    except BagError as error:
        plan.error = str(error)
    finally:
        reader.close()
    cut()
    return plan


def published_shards(output: Path, name: str) -> dict[int, dict]:
    """The published shards of bag ``name`` under ``output``: index -> their recorded counts."""
    return {int(folder.name.removeprefix('shard_')): json.loads((folder / 'shard.json').read_text())
            for folder in sorted(parts_dir(output / name).glob('shard_*'))}


def label_shard(pipeline: TridentPipeline, vocabulary: Vocabulary, shard: Shard, options: BagOptions,
                output: Path, png_dir: Path | None = None) -> ShardResult:
    """Label ``shard`` into a private attempt folder and publish it (the first attempt to publish wins).

    Per-shard failures (a bag that cannot be read, a shard that killed :data:`MAX_ATTEMPTS`
    processes) come back in ``error``; the attempt folder of a process killed meanwhile stays
    until :meth:`Job.finish` or a resumed job removes it.

    Args:
        pipeline: the loaded pipeline.
        vocabulary: ``pipeline.encode_vocabulary(options.vocabulary)``.
        shard: what to label.
        options: as for :func:`bags.label_bag`.
        output: the job's output folder.
        png_dir: overlay and label PNGs go to ``png_dir/<bag>/``.
    """
    result = ShardResult(name=shard.name, index=shard.index, node=socket.gethostname(), pid=os.getpid())
    folder = parts_dir(output / shard.name)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f'shard_{shard.index:05d}'
    earlier = len(list(folder.glob(f'.tmp_{shard.index:05d}_*')))
    if final.exists():
        return ShardResult(**{**json.loads((final / 'shard.json').read_text()), 'duplicate': True})
    if earlier >= MAX_ATTEMPTS:
        result.error = f'{shard.bag}: shard {shard.index} ended {earlier} processes (killed or crashed); not retried'
        return result
    attempt = folder / f'.tmp_{shard.index:05d}_{uuid.uuid4().hex}'
    attempt.mkdir()
    (attempt / 'pid').write_text(str(os.getpid()))
    try:
        _label_attempt(pipeline, vocabulary, shard, options, attempt, png_dir, result)
    except BagError as error:  # the bag fails; this attempt is no killed process's: it goes
        shutil.rmtree(attempt)
        result.error = str(error)
        return result
    (attempt / 'shard.json').write_text(json.dumps(asdict(result)))
    try:
        os.rename(attempt, final)
    except OSError:  # published by another attempt meanwhile: this copy goes
        shutil.rmtree(attempt)
        result.duplicate = True
    return result


def _label_attempt(pipeline: TridentPipeline, vocabulary: Vocabulary, shard: Shard, options: BagOptions,
                   attempt: Path, png_dir: Path | None, result: ShardResult) -> None:
    """Label ``shard`` into the part bag ``attempt/part_0000`` (none when every frame is refused), counting in
    ``result``.
    """
    reader, connections, storage = open_topic(Path(shard.bag), options)
    wanted = set(shard.times)
    parts = Parts(attempt, make_typestore(), storage, bag_settings(options, Path(shard.bag)), options,
                  len(shard.times) + 1)
    try:
        for item in selected_messages(reader, connections, options, window=(shard.times[0], shard.times[-1])):
            if item[1] not in wanted:
                continue
            began = time.monotonic()
            if label_frame(pipeline, vocabulary, reader, item, parts, png_dir and png_dir / shard.name):
                result.labelled += 1
                result.seconds += time.monotonic() - began
            else:
                result.refused += 1
    finally:
        parts.close()
        reader.close()


@dataclass
class _Bag:
    """The driver's record of one bag."""

    plan: BagPlan | None = None
    result: BagResult | None = None
    done: dict[int, ShardResult] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)
    duplicates: int = 0
    redone: int = 0
    error: str | None = None
    status: str = 'pending'
    recorded: dict | None = None  # the manifest's record of a bag an earlier run completed
    early: list[ShardResult] = field(default_factory=list)  # results that came before the plan


class Job:
    """The driver's side of a job: plans and shard results in, merges, progress and the manifest out.

    Args:
        output: the job's output folder.
        bags: (bag, output path) of every bag.
        options: as for :func:`bags.label_bag`.
        settings: what a resumed job must share with this one (written in the manifest).
        resume: continue the job whose manifest is in ``output``.

    Raises:
        ConfigError: ``output`` holds another job (without ``resume``) or one with other settings.
    """

    def __init__(self, output: Path, bags: list[tuple[Path, str]], options: BagOptions, settings: dict,
                 resume: bool) -> None:
        self.output, self.options, self.settings = output, options, settings
        self.manifest = output / MANIFEST
        self.sources = {name: str(bag.resolve()) for bag, name in bags}
        self.bags = {name: _Bag() for _, name in bags}
        if self.manifest.exists() or any((output / name).exists() or parts_dir(output / name).exists()
                                         for name in self.bags):
            if not resume:
                raise ConfigError(f'{output} holds an earlier run: pass --resume to continue it, or choose another '
                               f'output')
            if not self.manifest.exists():
                raise ConfigError(f'cannot resume into {output}: it holds bag outputs or parts but no {MANIFEST}')
            recorded = json.loads(self.manifest.read_text()).get('settings')
            if recorded != settings:
                raise ConfigError(f'cannot resume into {output}: {self.manifest} was made with other settings '
                               f'({recorded}); now: {settings}')
            self._discard_attempts()
            for name, record in json.loads(self.manifest.read_text())['bags'].items():
                if name in self.bags and record['status'] == 'complete' and (output / name).exists():
                    self.bags[name] = _Bag(status='complete', recorded=record, result=BagResult(
                        output=output / name, selected=record['selected'], resumed=record['selected'],
                        refused=record['refused'], complete=True))
        self.progress = tqdm(total=0, unit='frame', disable=None, desc='frames')

    def todo(self) -> list[tuple[str, str]]:
        """(bag, output path) of the bags not complete yet."""
        return [(self.sources[name], name) for name, record in self.bags.items() if record.status != 'complete']

    def add_plan(self, plan: BagPlan) -> None:
        """Take a bag's plan (its published shards' counts read back); merge it if nothing is left to do."""
        record = self.bags[plan.name]
        record.plan, record.status = plan, 'running'
        record.result = BagResult(output=self.output / plan.name, selected=plan.selected)
        record.error = plan.error
        self.progress.total += plan.selected
        earlier = published_shards(self.output, plan.name)
        for index in plan.published:
            counts = ShardResult(**earlier[index])
            record.result.resumed += counts.labelled
            record.result.refused += counts.refused
            record.done[index] = counts
            self.progress.update(counts.labelled + counts.refused)
        for shard in record.early:
            self.add_shard(shard)
        self._finish_bag(plan.name)

    def add_shard(self, shard: ShardResult) -> None:
        """Count one attempt's result once per shard (one that comes before its bag's plan waits for it)."""
        record = self.bags[shard.name]
        if record.plan is None:
            record.early.append(shard)
            return
        if shard.error is not None:
            record.failed.add(shard.index)
            record.error = record.error or shard.error
        elif shard.duplicate:
            record.duplicates += 1
        if shard.error is None and shard.index not in record.done:
            record.done[shard.index] = shard
            record.nodes.add(shard.node)
            record.result.labelled += shard.labelled
            record.result.refused += shard.refused
            record.result.seconds += shard.seconds
            self.progress.update(shard.labelled + shard.refused)
        self._finish_bag(shard.name)

    def _finish_bag(self, name: str) -> None:
        """Once every shard of the bag came back: merge its published parts in shard order, log, record."""
        from rosbags.rosbag2 import StoragePlugin

        record = self.bags[name]
        plan = record.plan
        if record.status != 'running' or len(record.done) + len(record.failed - set(record.done)) < plan.count:
            self.write_manifest()
            return
        output = self.output / name
        folder = parts_dir(output)
        if len(record.done) == plan.count:  # every shard published (a read error: the frames before it)
            parts = [folder / f'shard_{index:05d}' / 'part_0000' for index in range(plan.count)]
            parts = [part for part in parts if part.exists()]  # a shard of refused frames only has none
            if parts:
                storage = StoragePlugin[bag_info(parts[0])['storage_identifier'].upper()]
                merge_parts(parts, output, make_typestore(), storage, bag_settings(self.options, Path(plan.bag)))
        result = record.result
        record.redone = len(list(folder.glob('.tmp_*')))  # attempts of processes that died: their shards redone
        if record.error is None:
            result.complete = True
            record.status = 'complete'
            shutil.rmtree(folder, ignore_errors=True)
        else:
            record.status = 'failed'
            logger.error('%s failed: %s', name, record.error)
        per_frame = result.seconds / result.labelled if result.labelled else 0.0
        logger.info('%s: %d frame(s) selected, %d labelled (%.3f s/frame), %d already labelled, %d refused; '
                    '%d shard(s) on %d node(s), %d redone after a worker died -> %s', name, result.selected,
                    result.labelled, per_frame, result.resumed, result.refused, plan.count, len(record.nodes),
                    record.redone, output)
        self.write_manifest()

    def _discard_attempts(self) -> int:
        """Remove the attempt folders left by killed processes; how many there were."""
        attempts = [attempt for name in self.bags for attempt in parts_dir(self.output / name).glob('.tmp_*')]
        for attempt in attempts:
            shutil.rmtree(attempt, ignore_errors=True)
        return len(attempts)

    def write_manifest(self) -> None:
        """``trident-fleet.json``: the settings, each bag's status, counts and error (temp file, then renamed).

        The first call starts the job on disk: it must come before any shard can be published.
        """
        bags = {}
        for name, record in self.bags.items():
            result = record.result or BagResult(output=self.output / name)
            plan = record.plan
            if record.recorded is not None:
                bags[name] = record.recorded
                continue
            bags[name] = {'source': self.sources[name], 'status': record.status, 'selected': result.selected,
                          'labelled': result.labelled, 'resumed': result.resumed, 'refused': result.refused,
                          'shards': plan.count if plan else None, 'published': len(record.done),
                          'duplicates': record.duplicates, 'redone': record.redone, 'nodes': sorted(record.nodes),
                          'seconds': round(result.seconds, 3), 'error': record.error}
        self.output.mkdir(parents=True, exist_ok=True)
        staging = self.manifest.with_name(f'.{MANIFEST}.tmp')
        staging.write_text(json.dumps({'settings': self.settings, 'bags': bags}, indent=1))
        os.replace(staging, self.manifest)

    def finish(self, interrupted: bool = False) -> FleetResult:
        """Close the job: attempt folders of killed processes removed (counted as redone), the manifest written."""
        self.progress.close()
        redone = self._discard_attempts()
        if redone:
            logger.info('%d shard attempt(s) of killed processes discarded (their shards were redone)', redone)
        fleet = FleetResult(output=self.output, interrupted=interrupted)
        for name, record in self.bags.items():
            if record.status == 'running' and not interrupted:
                record.status, record.error = 'failed', record.error or 'not every shard came back'
            if record.status == 'running':
                record.status = 'interrupted'
            fleet.bags[name] = record.result or BagResult(output=self.output / name)
            if record.status == 'failed':
                fleet.errors[name] = record.error or ''
        self.write_manifest()
        return fleet
