"""trident-bench runs on the small configuration and reports every field (no timing assertions)."""
from __future__ import annotations

import json
import subprocess
import sys


def test_bench_reports_every_field():
    result = subprocess.run([sys.executable, '-m', 'trident_ros.bench', '--tiny', '--repeat', '1', '--warmup', '0',
                             '--size', '96x64', '--device', 'cpu', '--json'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report['image_size'] == [96, 64] and report['device'] == 'cpu' and report['dtype'] == 'float32'
    for stage in ('sam_encoder', 'dino', 'clip', 'splice', 'aggregation', 'labelling', 'refinement', 'masks'):
        assert report['stages_s'][stage]['median'] > 0, stage
    for total in ('encoders_only', 'full_refine_off', 'full_refine_on', 'relabel_refine_off'):
        assert report['totals_s'][total]['min'] > 0, total
    totals = report['totals_s']
    assert report['overhead_ratio_refine_off'] == totals['full_refine_off']['median'] / totals['encoders_only']['median']
    assert report['relabel_ratio_refine_off'] == (totals['relabel_refine_off']['median']
                                                  / totals['full_refine_off']['median'])
    assert report['text_ratio'] > 0 and report['peak_rss_bytes'] > 0
    assert report['aggregation_peak_extra_bytes'] >= 0 and 'RSS' in report['aggregation_memory_method']


def test_bench_table_names_the_ratios():
    result = subprocess.run([sys.executable, '-m', 'trident_ros.bench', '--tiny', '--repeat', '1', '--warmup', '0',
                             '--size', '64x48', '--device', 'cpu'], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for text in ('overhead ratio', 'relabel ratio', 'encoders_only', 'text features', 'peak RSS', 'device: cpu'):
        assert text in result.stdout, text
