"""The core installs alone: `pip install` of this package's wheel into a plain venv that holds only what
setup.py declares (the declared requirements and theirs, linked from this interpreter's installed
distributions, nothing reinstalled), then the installed `trident-segment` on an image and on a bag with
tiny random weights -- no ROS, no source tree, no colcon install on the paths. An import the core makes of
an undeclared distribution (e.g. rosbags-image before #21) fails here.
"""
from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_bag_labelling import CLASSES, SIZE, TOPIC, VOCABULARY, check_frames, input_stamps, make_bag, read_output

ROOT = Path(__file__).resolve().parents[2]


def declared_closure(requirements: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions of ``requirements`` and, transitively, of theirs (markers and extras applied).

    Raises:
        importlib.metadata.PackageNotFoundError: a declared requirement is not installed here.
    """
    found: dict[str, importlib.metadata.Distribution] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(text), frozenset({''})) for text in requirements]
    while todo:
        requirement, extras = todo.pop()
        if requirement.marker and not any(requirement.marker.evaluate({'extra': e}) for e in extras):
            continue
        name = canonicalize_name(requirement.name)
        wanted = frozenset({'', *requirement.extras})
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        found[name] = found.get(name) or importlib.metadata.distribution(requirement.name)
        todo += [(Requirement(text), wanted) for text in found[name].requires or []]
    return list(found.values())


def link_distributions(distributions: list[importlib.metadata.Distribution], site_packages: Path) -> None:
    """Make ``distributions`` importable in ``site_packages`` by linking their top-level files and folders.

    A folder that other installed distributions also fill (a namespace such as ``rosbags/``, where
    rosbags-image adds ``rosbags/image``) is made here and its entries are linked one level down, so
    that nothing of a distribution outside ``distributions`` becomes importable.
    """
    owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for distribution in importlib.metadata.distributions():
        for file in distribution.files or []:
            owners[file.parts[:1]].add(canonicalize_name(distribution.metadata['Name']))
    for distribution in distributions:
        name = canonicalize_name(distribution.metadata['Name'])
        for file in distribution.files or []:
            if file.parts[0] in ('..', '__pycache__'):
                continue
            prefix = file.parts[:1] if owners[file.parts[:1]] == {name} else file.parts[:2]
            target = site_packages.joinpath(*prefix)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(Path(distribution.locate_file(Path(*prefix))))


def run(command: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``command`` with nothing of ROS, of the source tree or of the outer venv in the environment."""
    env = {'PATH': '/usr/bin:/bin', 'HOME': str(cwd), 'HF_HUB_OFFLINE': '1', 'LANG': 'C.UTF-8'}
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope='module')
def installed(tmp_path_factory) -> Path:
    """A venv with this package's wheel installed and only its declared dependencies importable; its folder."""
    work = tmp_path_factory.mktemp('install')
    source = work / 'source'  # a copy: the wheel build writes build/ and *.egg-info where it runs
    source.mkdir()
    shutil.copy(ROOT / 'setup.py', source)
    for folder in ('trident_ros', 'msg'):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns('__pycache__'))
    built = run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
                 '--wheel-dir', work / 'dist', source], work)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((work / 'dist').glob('trident_ros-*.whl'))
    venv = work / 'venv'
    created = run([sys.executable, '-m', 'venv', '--without-pip', venv], work)
    assert created.returncode == 0, created.stderr
    site_packages = Path(sysconfig.get_path('purelib', vars={'base': str(venv), 'platbase': str(venv)}))
    shutil.unpack_archive(wheel, work / 'wheel', format='zip')
    requirements = importlib.metadata.Distribution.at(next((work / 'wheel').glob('*.dist-info'))).requires or []
    link_distributions(declared_closure(requirements), site_packages)
    install = run([sys.executable, '-m', 'pip', '--python', venv / 'bin' / 'python', 'install', '--no-deps',
                   '--no-index', wheel], work)
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


def test_the_installed_core_imports_from_the_venv_without_ros(installed, tmp_path):
    probe = ('import importlib.util, sys, trident_ros.tools.segment, trident_ros.tools.bags; '
             'print(trident_ros.tools.segment.__file__); '
             "print([n for n in ('rclpy', 'sensor_msgs', 'cv_bridge') if importlib.util.find_spec(n)])")
    result = run([installed / 'bin' / 'python', '-c', probe], tmp_path)
    assert result.returncode == 0, result.stderr
    location, ros = result.stdout.splitlines()
    assert Path(location).is_relative_to(installed) and ros == '[]'


def test_installed_segment_labels_an_image(installed, tmp_path):
    image = cv2.resize(cv2.imread(str(ROOT / 'trident_ros' / 'data' / 'street.png')), SIZE)
    cv2.imwrite(str(tmp_path / 'street.png'), image)
    result = run([installed / 'bin' / 'trident-segment', tmp_path / 'street.png', '-v', VOCABULARY,
                  '--random-weights', '--tiny', '-o', tmp_path / 'out'], tmp_path)
    assert result.returncode == 0, result.stderr
    labels = cv2.imread(str(tmp_path / 'out' / 'street_labels.png'), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (SIZE[1], SIZE[0]) and set(np.unique(labels)) <= {0, 1, 2, 3}
    summary = json.loads((tmp_path / 'out' / 'street_masks.json').read_text(encoding='utf-8'))
    assert summary['vocabulary'] == CLASSES and summary['size'] == [SIZE[1], SIZE[0]]
    assert sum(mask['area'] for mask in summary['masks']) == int((labels > 0).sum())


def test_installed_segment_labels_a_bag(installed, tmp_path):
    bag = make_bag(tmp_path / 'bag', 'sqlite3', False, 2)  # raw images: rosbags-image decodes them
    result = run([installed / 'bin' / 'trident-segment', bag, '--topic', TOPIC, '-v', VOCABULARY,
                  '--random-weights', '--tiny', '-o', tmp_path / 'labeled'], tmp_path)
    assert result.returncode == 0, result.stderr
    assert '2 frame(s) selected, 2 labelled' in result.stderr, result.stderr
    check_frames(read_output(tmp_path / 'labeled'), input_stamps(2), segmentation=False)
