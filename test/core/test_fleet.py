"""`trident-segment --ray` on a local Ray cluster: the output equals a single-process run's, through faults.

One Ray instance for the whole session (2 CPUs, no dashboard); the command runs as a subprocess that
joins it by address (a driver killed by SIGKILL would orphan the agents of a cluster it started
itself). Workers have 1 CPU, so 1 thread: the references are :func:`label_bag` run here with 1 thread.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_bag_labelling import ROOT, TOPIC, VOCABULARY, make_bag
from test_shards import CONFIG, raw_topics

from trident_ros.tools.bag_messages import BagError
from trident_ros.tools.bags import BagOptions, label_bag, parts_dir
from trident_ros.tools.shards import MANIFEST

ray = pytest.importorskip('ray')
pytestmark = pytest.mark.ray

GOOD = ('a/run1', 'b/run2')
ALONE = {'run1': 'a/run1', 'run2': 'b/run2'}
"""Output paths of the good bags given one by one (their folders: ``a``, ``b``)."""
OPTIONS = BagOptions(topic=TOPIC, vocabulary=VOCABULARY, every=2)


@pytest.fixture(scope='module')
def ray_address():
    """The address of this module's local Ray instance, shut down after its tests: no Ray process outlives them or
    runs beside the other tests (its object store would share /dev/shm with Fast DDS). Its object store is small:
    images never enter it.
    """
    previous = os.environ.get('RAY_AUTH_MODE')
    os.environ['RAY_AUTH_MODE'] = 'disabled'  # else a local ray.init writes ~/.ray/auth_token
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop('RAY_AUTH_MODE')
        else:
            os.environ['RAY_AUTH_MODE'] = previous


@pytest.fixture(scope='module')
def bags(tmp_path_factory) -> Path:
    """Two good bags of 6 frames (3 selected with --every 2) and a corrupt one."""
    root = tmp_path_factory.mktemp('fleet') / 'bags'
    make_bag(root / 'a' / 'run1', 'sqlite3', False, 6)
    make_bag(root / 'b' / 'run2', 'mcap', True, 6)
    broken = make_bag(root / 'c' / 'broken', 'sqlite3', False, 8)
    with (broken / 'broken.db3').open('r+b') as file:  # as in test_bag_labelling: a read error mid-bag
        file.seek((broken / 'broken.db3').stat().st_size * 6 // 10)
        file.write(b'\xff' * 5000)
    return root


@pytest.fixture(scope='module')
def references(bags, tmp_path_factory) -> dict[str, dict]:
    """Each bag's output from label_bag in this process with one thread (the broken one: up to its error)."""
    from trident_ros.pipeline import TridentPipeline

    out = tmp_path_factory.mktemp('reference')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline = TridentPipeline(CONFIG)
        vocabulary = pipeline.encode_vocabulary(VOCABULARY)
        for name in (*GOOD, 'c/broken'):
            try:
                label_bag(pipeline, vocabulary, bags / name, out / name, OPTIONS)
            except BagError:
                assert name == 'c/broken'
    finally:
        torch.set_num_threads(threads)
    return {name: raw_topics(out / name) for name in (*GOOD, 'c/broken')}


def command(address: str, *args: str) -> list[str]:
    return [sys.executable, '-m', 'trident_ros.tools.segment', *args, '--topic', TOPIC, '-v', VOCABULARY,
            '--every', '2', '--random-weights', '--tiny', '--ray', address]


def environment() -> dict[str, str]:
    return {**os.environ, 'RAY_AUTH_MODE': 'disabled'}


def segment(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(address, *args), capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env=environment())


def start(address: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(command(address, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=environment())


def wait_for(condition, process: subprocess.Popen, seconds: float = 120):
    """Poll ``condition()`` until it returns something true (returned) while ``process`` runs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    process.kill()
    pytest.fail(f'gave up waiting (exit {process.wait()}): {process.stderr.read()}')


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())['bags']


def check_outputs(out: Path, references: dict, names: dict[str, str]) -> None:
    """Each bag's output (``names``: output path -> reference) equals its reference byte for byte per topic, and
    its parts are gone.
    """
    for name, reference in names.items():
        assert raw_topics(out / name) == references[reference], name
        assert not parts_dir(out / name).exists()


def test_fleet_equals_single_process_and_a_corrupt_bag_fails_alone(ray_address, bags, references, tmp_path):
    out = tmp_path / 'out'
    result = segment(ray_address, str(bags), '-o', str(out), '--workers', '2', '--checkpoint', '2')
    assert result.returncode == 1, result.stderr
    check_outputs(out, references, {name: name for name in GOOD})
    record = manifest(out)
    assert {name: (record[name]['status'], record[name]['labelled'], record[name]['shards'])
            for name in GOOD} == dict.fromkeys(GOOD, ('complete', 3, 2))
    broken = record['c/broken']
    assert broken['status'] == 'failed' and f'reading {TOPIC} failed after message #' in broken['error']
    assert f'c/broken failed: {bags / "c" / "broken"}: reading {TOPIC} failed' in result.stderr
    assert raw_topics(out / 'c' / 'broken') == references['c/broken']  # the frames before the error, as alone
    assert '2 of 3 bag(s) complete' in result.stderr


def test_a_worker_killed_mid_shard_changes_nothing_in_the_output(ray_address, bags, references, tmp_path):
    out = tmp_path / 'out'
    process = start(ray_address, str(bags / 'a'), str(bags / 'b'), '-o', str(out), '--workers', '1',
                    '--checkpoint', '3')
    try:
        attempt = wait_for(lambda: next(iter(out.glob('*.parts/.tmp_*/pid')), None), process).parent
        os.kill(int((attempt / 'pid').read_text()), signal.SIGKILL)
        killed_mid_shard = attempt.exists()  # not renamed to shard_*: it died before publishing
        _, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert killed_mid_shard
    check_outputs(out, references, ALONE)
    record = manifest(out)
    assert [(r['status'], r['shards'], r['published'], r['duplicates']) for r in record.values()] == [
        ('complete', 1, 1, 0)] * 2
    assert sorted(r['redone'] for r in record.values()) == [0, 1]  # the killed attempt's shard, once
    assert 'shard(s) on 1 node(s), 1 redone after a worker died' in stderr


def test_a_killed_driver_resumes_with_only_the_missing_shards(ray_address, bags, references, tmp_path):
    out = tmp_path / 'out'
    process = start(ray_address, str(bags / 'a'), str(bags / 'b'), '-o', str(out), '--workers', '2',
                    '--checkpoint', '1')
    try:
        wait_for(lambda: len(list(out.glob('*.parts/shard_*'))) >= 2, process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    workers = {int(pid.read_text()) for pid in out.glob('*.parts/*/pid')}
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:  # they die with their driver
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)
    published = {name: len(list(parts_dir(out / name).glob('shard_*'))) for name in ('run1', 'run2')}
    assert 2 <= sum(published.values()) < 6
    result = segment(ray_address, str(bags / 'a'), str(bags / 'b'), '-o', str(out), '--workers', '2',
                     '--checkpoint', '1', '--resume')
    assert result.returncode == 0, result.stderr
    check_outputs(out, references, ALONE)
    for name in ALONE:
        record = manifest(out)[name]
        assert (record['resumed'], record['labelled'], record['status']) == (
            published[name], 3 - published[name], 'complete'), record


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('TRIDENT_RAY_NODE_LOSS'),
                    reason='a second Ray instance: 45-65 s on 2 cores; set TRIDENT_RAY_NODE_LOSS=1 to run it')
def test_a_node_lost_mid_run_changes_nothing_in_the_output(bags, references, tmp_path, monkeypatch):
    """A simulated two-node cluster (its own head, not the session's instance) loses its second node mid-run."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv('RAY_AUTH_MODE', 'disabled')
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={'num_cpus': 1, 'include_dashboard': False})
    try:
        node = cluster.add_node(num_cpus=1)
        out = tmp_path / 'out'
        process = start(cluster.address, str(bags / 'a'), str(bags / 'b'), '-o', str(out), '--workers', '2',
                        '--checkpoint', '1')
        try:  # both workers busy (two attempts seen), then the second node goes without notice
            wait_for(lambda: len({p.read_text() for p in out.glob('*.parts/*/pid')}) >= 2, process)
            cluster.remove_node(node, allow_graceful=False)
            cluster.add_node(num_cpus=1)  # a replacement, as an autoscaler would bring
            _, stderr = process.communicate(timeout=180)
        finally:
            process.kill()
    finally:
        cluster.shutdown()
    assert process.returncode == 0, stderr
    check_outputs(out, references, ALONE)
    record = manifest(out)
    assert [(r['status'], r['shards'], r['published']) for r in record.values()] == [('complete', 3, 3)] * 2
    assert len({node for r in record.values() for node in r['nodes']}) >= 2
