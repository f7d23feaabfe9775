"""bench/gpu_check.py on the CPU with tiny models (bf16 against fp32), so the CUDA check cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_the_cpu_and_compares_the_precisions(tmp_path):
    """Also its compiled run (torch.compile's eager backend: the wrapping, not inductor's minutes) and its
    onnxruntime run (CPU provider, the exported graphs).
    """
    pytest.importorskip('onnxruntime')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_check.py'), '--device', 'cpu', '--tiny',
                             '--size', '128x96', '--frames', '1', '--compile', '--compile-backend', 'eager',
                             '--onnx', '--providers', 'cpu', '--engine-cache-dir', str(tmp_path), '--json'],
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert (report['device'], report['scale'], report['size']) == ('cpu', 'tiny', [128, 96])
    assert set(report['runs']) == {'float32', 'bfloat16', 'bfloat16+compile', 'float32+onnxruntime'}
    assert 0 < report['flipped_thresholds'] < 0.05  # bf16 flips a few of SAM's aggregation decisions, not many
    assert report['agreement']['onnxruntime']['dense_cosine_min'] > 0.9999
    assert report['agreement']['onnxruntime']['label_agreement'] >= 0.999
    assert 0.99 < report['agreement']['compiled']['dense_cosine_mean'] < 1.0
    assert sorted(path.name.split('-')[0] for path in tmp_path.glob('*.onnx')) == \
        ['clip_guided', 'dino_patches', 'sam_decoder', 'sam_fused']
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


