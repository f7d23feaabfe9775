"""The ROS side of test_bench.py: tests that need the colcon install and rclpy."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]




def test_node_bench_launches_the_node_and_reports(tmp_path):
    """bench/node_bench.py --launch: a tiny node (its executable, no launch) on a domain of its own, 3 frames,
    every field.
    """
    env = dict(os.environ, ROS_LOG_DIR=str(tmp_path), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    for name in ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE'):  # Fast DDS 3.x, 2.x
        env.setdefault(name, str(ROOT / 'config' / 'fastdds_large_data.xml'))
    result = subprocess.run([sys.executable, str(ROOT / 'bench' / 'node_bench.py'), '--launch', '--frames', '3',
                             '--rate', '2', '--warmup', '1', '--json', '--domain-id', str(random.randint(200, 230))],
                            capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report['size'] == [640, 480] and report['frames_published'] == 3
    assert report['segmentations_received'] + report['node_counters']['frames_dropped'] >= 3
    latency = report['latency_ms']
    assert latency['count'] == report['segmentations_received'] and latency['min'] > 0
    assert set(report['node_counters']) >= {'frames_received', 'frames_processed', 'frames_dropped'}
    assert report['node_status']['device'] == 'cpu' and float(report['node_status']['processing_rate_hz']) >= 0
    # frames that a diagnostics status described: overhead = latency - pipeline, both positive
    assert report['overhead_ms']['count'] == report['pipeline_ms']['count']
    if report['pipeline_ms']['count']:
        assert report['pipeline_ms']['min'] > 0 and report['overhead_ms']['min'] > 0
        assert {'queue', 'conversion', 'publish', 'transport_and_rest'} == set(report['overhead_parts_ms'])
