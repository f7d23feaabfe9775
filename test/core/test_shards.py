"""Many bags without Ray: finding bags, planning shards, publishing a shard once, merging, the manifest, resuming.

Real bags (written with rosbags as in test_bag_labelling), a tiny random-weight pipeline loaded once in
this process; outputs are compared with :func:`label_bag`'s byte for byte per topic.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rosbags.highlevel import AnyReader
from test_bag_labelling import ROOT, TOPIC, VOCABULARY, input_stamps, make_bag

from trident_ros.config import TridentConfig
from trident_ros.errors import ConfigError
from trident_ros.tools.bags import BagOptions, label_bag, parts_dir
from trident_ros.tools.fleet import find_bags, job_settings, label_bags
from trident_ros.tools.shards import MANIFEST, MAX_ATTEMPTS, Job, label_shard, plan_bag

CONFIG = TridentConfig.from_mapping({'models.random_weights': True, 'models.model_scale': 'tiny'})


def raw_topics(bag: Path) -> dict[tuple[str, str], list[tuple[int, bytes]]]:
    """(topic, type) -> [(bag time, serialized message)] of a bag."""
    topics: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
    with AnyReader([bag]) as reader:
        for connection, timestamp, data in reader.messages():
            topics.setdefault((connection.topic, connection.msgtype), []).append((timestamp, bytes(data)))
    return topics


@pytest.fixture(scope='module')
def pipeline():
    from trident_ros.pipeline import TridentPipeline

    pipeline = TridentPipeline(CONFIG)
    return pipeline, pipeline.encode_vocabulary(VOCABULARY)


@pytest.fixture(scope='module')
def bags(tmp_path_factory) -> Path:
    """``bags/a/run1`` (sqlite3, raw images) and ``bags/b/run2`` (MCAP, compressed), 6 frames each."""
    root = tmp_path_factory.mktemp('fleet') / 'bags'
    make_bag(root / 'a' / 'run1', 'sqlite3', False, 6)
    make_bag(root / 'b' / 'run2', 'mcap', True, 6)
    return root


def test_find_bags_names_outputs_by_path_and_refuses_collisions(bags, tmp_path):
    assert find_bags([bags]) == [(bags / 'a' / 'run1', 'a/run1'), (bags / 'b' / 'run2', 'b/run2')]
    assert find_bags([bags / 'a' / 'run1', bags / 'b']) == [(bags / 'a' / 'run1', 'run1'),
                                                            (bags / 'b' / 'run2', 'run2')]
    with pytest.raises(ConfigError, match='both be written to run1'):
        find_bags([bags / 'a' / 'run1', bags / 'a'])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ConfigError, match='holds no rosbag2 bag'):
        find_bags([tmp_path / 'empty'])
    with pytest.raises(ConfigError, match='not a rosbag2 bag nor a folder'):
        find_bags([tmp_path / 'missing'])


def test_plan_cuts_the_selection_into_shards_and_leaves_out_published_ones(tmp_path):
    bag = make_bag(tmp_path / 'run1', 'sqlite3', False, 9)
    options = BagOptions(topic=TOPIC, vocabulary=VOCABULARY, every=2, start=0.1, end=0.85)  # frames 1, 3, 5, 7
    times = [t for t, _, _ in input_stamps(9)]
    plan = plan_bag(str(bag), 'run1', options, 3, tmp_path / 'out')
    assert (plan.count, plan.selected, plan.error, plan.published) == (2, 4, None, [])
    assert [(s.index, s.times) for s in plan.shards] == [(0, (times[1], times[3], times[5])), (1, (times[7],))]
    published = parts_dir(tmp_path / 'out' / 'run1') / 'shard_00000'
    published.mkdir(parents=True)
    again = plan_bag(str(bag), 'run1', options, 3, tmp_path / 'out')
    assert again.published == [0] and [s.index for s in again.shards] == [1] and again.count == 2
    missing = plan_bag(str(tmp_path / 'nope'), 'nope', options, 3, tmp_path / 'out')
    assert missing.count == 0 and 'cannot open the bag' in missing.error


def test_a_corrupt_bag_is_planned_up_to_its_read_error(tmp_path):
    bag = make_bag(tmp_path / 'run1', 'sqlite3', False, 8)
    database = bag / 'run1.db3'
    with database.open('r+b') as file:  # as in test_bag_labelling: the second half of the pages garbled
        file.seek(database.stat().st_size * 6 // 10)
        file.write(b'\xff' * 5000)
    plan = plan_bag(str(bag), 'run1', BagOptions(topic=TOPIC, vocabulary=VOCABULARY), 2, tmp_path / 'out')
    assert f'reading {TOPIC} failed after message #{plan.selected}' in plan.error
    assert 0 < plan.selected < 8 and sum(len(s.times) for s in plan.shards) == plan.selected


def test_here_equals_label_bag_byte_for_byte_with_a_manifest(bags, pipeline, tmp_path):
    options = BagOptions(topic=TOPIC, vocabulary=VOCABULARY, every=2, segmentation=True)
    result = label_bags([bags], tmp_path / 'out', options, CONFIG, checkpoint=2, png_dir=tmp_path / 'png')
    assert not result.errors and all(bag.complete for bag in result.bags.values())
    for name in ('a/run1', 'b/run2'):
        reference = label_bag(*pipeline, bags / name, tmp_path / 'reference' / name, options)
        assert raw_topics(tmp_path / 'out' / name) == raw_topics(reference.output)
        assert not parts_dir(tmp_path / 'out' / name).exists()
        assert len(list((tmp_path / 'png' / name).glob('*_labels.png'))) == 3
    manifest = json.loads((tmp_path / 'out' / MANIFEST).read_text())
    assert manifest['settings'] == job_settings(options, 2, CONFIG.flat())
    assert {name: (bag['status'], bag['selected'], bag['labelled'], bag['shards'], bag['published'])
            for name, bag in manifest['bags'].items()} == {'a/run1': ('complete', 3, 3, 2, 2),
                                                          'b/run2': ('complete', 3, 3, 2, 2)}


def test_a_shard_is_published_once(bags, pipeline, tmp_path):
    options = BagOptions(topic=TOPIC, vocabulary=VOCABULARY)
    shard = plan_bag(str(bags / 'a' / 'run1'), 'run1', options, 2, tmp_path).shards[1]
    first = label_shard(*pipeline, shard, options, tmp_path)
    second = label_shard(*pipeline, shard, options, tmp_path)  # a retry after the first had published
    assert (first.labelled, first.duplicate, second.duplicate) == (2, False, True)
    assert (second.labelled, second.pid) == (first.labelled, first.pid)
    assert sorted(p.name for p in parts_dir(tmp_path / 'run1').iterdir()) == ['shard_00001']
    folder = parts_dir(tmp_path / 'run1')
    with pytest.raises(OSError):  # what publishing relies on: no rename onto a non-empty folder
        os.rename(folder / 'shard_00001' / 'part_0000', folder / 'shard_00001')
    for number in range(MAX_ATTEMPTS):  # processes killed in shard 0
        (folder / f'.tmp_00000_{number}').mkdir()
    capped = label_shard(*pipeline, plan_bag(str(bags / 'a' / 'run1'), 'run1', options, 2, tmp_path).shards[0],
                         options, tmp_path)
    assert capped.error and f'shard 0 ended {MAX_ATTEMPTS} processes' in capped.error


def test_resume_labels_only_the_shards_not_published(bags, pipeline, tmp_path):
    options = BagOptions(topic=TOPIC, vocabulary=VOCABULARY)
    out = tmp_path / 'out'
    found = find_bags([bags / 'a' / 'run1'])
    job = Job(out, found, options, job_settings(options, 2, CONFIG.flat()), resume=False)
    plan = plan_bag(str(found[0][0]), 'run1', options, 2, out)
    job.add_shard(label_shard(*pipeline, plan.shards[0], options, out))  # on Ray, a result can beat its plan
    job.add_plan(plan)
    assert json.loads((out / MANIFEST).read_text())['bags']['run1']['published'] == 1
    (parts_dir(out / 'run1') / '.tmp_00001_killed').mkdir()  # an attempt whose process died
    assert job.finish(interrupted=True).interrupted
    assert json.loads((out / MANIFEST).read_text())['bags']['run1']['status'] == 'interrupted'
    with pytest.raises(ConfigError, match='pass --resume'):
        label_bags([bags / 'a' / 'run1'], out, options, CONFIG, checkpoint=2)
    with pytest.raises(ConfigError, match='other settings'):
        label_bags([bags / 'a' / 'run1'], out, options, CONFIG, checkpoint=3, resume=True)
    result = label_bags([bags / 'a' / 'run1'], out, options, CONFIG, checkpoint=2, resume=True).bags['run1']
    assert (result.selected, result.resumed, result.labelled, result.complete) == (6, 2, 4, True)
    reference = label_bag(*pipeline, bags / 'a' / 'run1', tmp_path / 'reference', options)
    assert raw_topics(out / 'run1') == raw_topics(reference.output)
    assert not parts_dir(out / 'run1').exists()
    again = label_bags([bags / 'a' / 'run1'], out, options, CONFIG, checkpoint=2, resume=True).bags['run1']
    assert (again.resumed, again.labelled, again.complete) == (6, 0, True)  # a finished bag is not redone
    assert json.loads((out / MANIFEST).read_text())['bags']['run1']['labelled'] == 4  # its record is kept


def test_without_ray_installed_ray_is_a_configuration_error(bags, tmp_path):
    (tmp_path / 'ray').mkdir()
    (tmp_path / 'ray' / '__init__.py').write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')])}
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.segment', str(bags), '--topic', TOPIC,
                             '-v', VOCABULARY, '-o', str(tmp_path / 'out'), '--ray', 'local', '--random-weights',
                             '--tiny'], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 2, result.stderr
    assert "pip install 'trident_ros[fleet]'" in result.stderr
    assert not (tmp_path / 'out').exists()  # nothing written: the same command works once Ray is installed


def test_several_bags_need_an_output_folder(bags):
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.segment', str(bags), '--topic', TOPIC,
                             '-v', VOCABULARY, '--random-weights', '--tiny'],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and 'need -o DIR' in result.stderr, result.stderr

