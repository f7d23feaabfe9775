"""The ROS side of test_gpu_check.py: tests that need the colcon install and rclpy."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]




def test_gpu_check_runs_the_node_and_reports_its_counters(tmp_path):
    """--node-frames: bench/node_bench.py --launch on the same device, its counters and the node's status."""
    env = dict(os.environ, ROS_LOG_DIR=str(tmp_path), ROS_DOMAIN_ID=str(random.randint(231, 232)))
    result = subprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_check.py'), '--device', 'cpu', '--tiny',
                             '--size', '64x48', '--frames', '1', '--node-frames', '3', '--node-rate', '2', '--json'],
                            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    node = json.loads(result.stdout)['node']
    assert node['frames_published'] == 3
    assert node['segmentations_received'] + node['node_counters']['frames_dropped'] >= 3
    assert node['node_status']['device'] == 'cpu'
