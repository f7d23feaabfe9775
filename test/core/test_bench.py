"""trident-bench runs on the small configuration and reports every field; bench/node_bench.py runs
against a tiny node it starts itself, without launch (no timing assertions).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from trident_ros.config import TridentConfig

ROOT = Path(__file__).resolve().parents[2]


def test_bench_reports_every_field():
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.bench',
                             '--tiny', '--repeat', '3', '--warmup', '0',
                             '--size', '96x64', '--device', 'cpu', '--json'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report['image_size'] == [96, 64] and report['device'] == 'cpu' and report['dtype'] == 'float32'
    assert report['clock'] == 'wall'
    for stage in ('sam_encoder', 'dino', 'clip', 'splice', 'aggregation', 'labelling', 'refinement', 'masks'):
        assert report['stages_s'][stage]['median'] > 0, stage
    for total in ('encoders_only', 'full_refine_off', 'full_refine_on', 'relabel_refine_off'):
        assert report['totals_s'][total]['min'] > 0, total
    totals = report['totals_s']
    pairs = zip(totals['full_refine_off']['samples'], totals['encoders_only']['samples'], strict=True)
    assert report['overhead_ratio_refine_off'] == statistics.median(full / encoders for full, encoders in pairs)
    assert report['relabel_ratio_refine_off'] == (totals['relabel_refine_off']['median']
                                                  / totals['full_refine_off']['median'])
    assert report['overhead_ratio_refine_on_min'] == totals['full_refine_on']['min'] / totals['encoders_only']['min']
    assert report['text_ratio'] > 0 and report['peak_rss_bytes'] > 0
    assert report['reused_frame_refine_off_s'] > 0 and report['reused_frame_ratio'] > 0  # the bench checks it reused
    assert report['aggregation_peak_extra_bytes'] >= 0 and 'RSS' in report['aggregation_memory_method']
    assert 0 < report['peak_rss_frame_bytes'] <= report['peak_rss_bytes']
    # tiny SAM: 2 heads, 16 x 16 grid; the square 64x64 crop -> 256 x 256 input, 16 x 16 valid tokens, chunks of
    # 64 queries (the default)
    assert report['aggregation_tokens'] == [16, 16]
    assert report['aggregation_chunk'] == TridentConfig().section('trident').aggregation_chunk == 64
    assert report['aggregation_chunk_blocks_bytes'] == 2 * 64 * 256 * 4  # heads x 4 rows of 16 queries x N keys


def test_bench_table_names_the_ratios_and_takes_chunk_and_clock():
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.bench',
                             '--tiny', '--repeat', '1', '--warmup', '0',
                             '--size', '64x48', '--device', 'cpu', '--aggregation-chunk', '7', '--clock', 'cpu'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # tiny SAM, square 48x48 crop -> 256 x 256 input, 16 x 16 tokens: a block of 2 heads x 16 queries x 256 keys, fp32
    for text in ('overhead ratio', 'relabel ratio', 'encoders_only', 'text features', 'peak RSS', 'device: cpu',
                 'clock cpu', 'peak RSS after the first repetition', 'unchanged frame with reuse_threshold on',
                 'aggregation (chunk 7, 16x16 tokens',
                 f'chunk block {2 * 16 * 256 * 4 / 2**20:.1f} MiB computed'):  # 1 row of 16 queries
        assert text in result.stdout, text




def test_bench_method_all_prints_one_row_per_method():
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.bench',
                             '--method', 'all', '--tiny', '--repeat', '1',
                             '--warmup', '0', '--size', '64x48', '--device', 'cpu', '--json'],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row['method'] for row in rows] == ['corrclip', 'trident', 'trident_fast', 'proxy', 'maskclip', 'sclip',
                                               'clearclip', 'naclip', 'cliptrase', 'scclip', 'resclip', 'resclip_rcs']
