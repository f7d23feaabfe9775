"""`make demo`'s program: each sample scene shown once, its overlay named after it, its own vocabulary.

Runs ``python -m trident_ros.tools.demo --random-weights --tiny`` as a user would (the node's executable started
and autostarted through the launch plan, without ``launch``; real DDS).
"""
from __future__ import annotations

import re
import subprocess
import sys

import cv2
import numpy as np
from ros_helpers import executable, fresh_domain_id, ros_env

from trident_ros.ros.fake_camera import sample_images
from trident_ros.ros.launch_plan import plan_launch
from trident_ros.tools.demo import (
    DEPTH_INFO_TOPIC,
    DEPTH_TOPIC,
    IMAGE_TOPIC,
    SCENE_VOCABULARIES,
    launch_arguments,
    parse_args,
)
from trident_ros.vocabulary import parse_vocabulary


def edges(bgr: np.ndarray) -> np.ndarray:
    """Unit-norm, zero-mean gradient magnitude of an image: compares scene structure, not colours."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    magnitude = np.abs(cv2.Sobel(grey, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    magnitude -= magnitude.mean()
    return magnitude / np.linalg.norm(magnitude)


def test_demo_starts_the_node_with_the_launch_files_defaults_and_its_options():
    """The demo's node is the launch file's node: its topics are the launch defaults, its options launch arguments."""
    [node] = plan_launch({}, '/share', {}).nodes
    remappings = dict(node.remappings)
    planned = remappings['image'], remappings['depth'], remappings['depth/camera_info']
    assert planned == (IMAGE_TOPIC, DEPTH_TOPIC, DEPTH_INFO_TOPIC)
    assert launch_arguments(parse_args([]), 'door') == {'image_topic': IMAGE_TOPIC, 'vocabulary': 'door'}
    options = parse_args(['--random-weights', '--tiny', '--device', 'cpu', '--depth'])
    assert launch_arguments(options, 'a, b') == {'image_topic': IMAGE_TOPIC, 'vocabulary': 'a, b',
                                                 'random_weights': 'true', 'model_scale': 'tiny', 'device': 'cpu',
                                                 'use_depth': 'true'}


def test_demo_writes_one_overlay_per_scene_named_after_it_with_its_vocabulary(tmp_path):
    out = tmp_path / 'demo_out'
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.demo',
                             '--random-weights', '--tiny', '--out', str(out),
                             '--timeout', '240'], env=ros_env(fresh_domain_id(), tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f'$ {executable("trident_node")} --ros-args -r __node:=trident '), result.stdout
    scenes = [path.stem for path in sample_images()]
    assert sorted(p.name for p in out.glob('*.png')) == sorted(f'{scene}_overlay.png' for scene in scenes)
    lines = [line for line in result.stdout.splitlines() if '_overlay.png' in line and ' -> ' in line]
    assert len(lines) == len(scenes), result.stdout
    samples = {path.stem: edges(cv2.imread(str(path))) for path in sample_images()}
    for scene, line in zip(scenes, lines, strict=True):
        classes = ['; '.join(names) for names in parse_vocabulary(SCENE_VOCABULARIES[scene]).classes]
        assert line.startswith(f'{scene} [{", ".join(classes)}]: '), line
        assert line.endswith(f'{out / scene}_overlay.png'), line
        labelled = re.findall(r' ?([^:,\[\]]+?) \d+\.\d%', line.split(']: ', 1)[1])
        assert labelled and set(labelled) <= set(classes), line  # masks of that scene's vocabulary only
        overlay = cv2.imread(str(out / f'{scene}_overlay.png'))
        assert overlay.shape == (480, 640, 3)
        similarity = {name: float((edges(overlay) * sample).sum()) for name, sample in samples.items()}
        assert max(similarity, key=similarity.get) == scene, similarity  # the overlay shows that scene
