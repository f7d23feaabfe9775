"""bench/gpu_check.py on the CPU with tiny models (bf16 against fp32), so the CUDA check cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_the_cpu_and_compares_the_precisions():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_check.py'), '--device', 'cpu', '--tiny',
                             '--size', '128x96', '--frames', '1', '--json'],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert (report['device'], report['scale'], report['size']) == ('cpu', 'tiny', [128, 96])
    assert set(report['runs']) == {'float32', 'bfloat16'}
    # identical weights: bf16 stays close to fp32, but is not fp32 (a cosine of exactly 1 would mean one dtype ran)
    assert 0.99 < report['dense_cosine_mean'] < 1.0
    assert 0.9 < report['dense_cosine_min'] <= report['dense_cosine_mean']
    assert 0.99 < report['text_cosine_mean'] <= 1.0
    assert 0.5 < report['label_agreement'] <= 1.0
    for run in report['runs'].values():
        assert {'windows', 'dino', 'clip', 'sam_encoder', 'labelling', 'refinement', 'masks'} <= set(run['stage_s'])
        assert run['frame_s'] >= sum(run['stage_s'][name] for name in ('dino', 'clip', 'sam_encoder'))
        assert run['relabel_s'] > 0
        assert run['max_memory_allocated_mb'] is None  # CPU
    assert report['node'] == {}


def test_gpu_check_says_when_there_is_no_cuda_device():
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES='')
    result = subprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_check.py'), '--tiny', '--frames', '1'],
                            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 1
    assert 'CUDA is not available' in result.stderr


