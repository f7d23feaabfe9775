"""``models.backend: onnxruntime`` end to end against ``torch`` on tiny random-weight models, the engine cache's keys,
the TensorRT cache's stale detection, the providers, ``trident-export``.
"""
from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from trident_ros.config import ConfigError, TridentConfig
from trident_ros.runtime.export import GraphKey, weights_hash
from trident_ros.runtime.onnx_runtime import (
    OnnxGraphs,
    available_providers,
    parse_providers,
    prepare_tensorrt_cache,
    stale_reason,
    tensorrt_cache_dir,
)

TINY = {'models.random_weights': True, 'models.model_scale': 'tiny', 'models.device': 'cpu'}
STACK = {'tensorrt': '10.3.0', 'onnxruntime': '1.23.0', 'cuda': '12.6', 'gpu': 'Orin', 'capability': '8.7'}


def kitchen() -> np.ndarray:
    from importlib.resources import files

    path = files('trident_ros') / 'data' / 'kitchen.png'
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.mark.onnx
@pytest.mark.parametrize(('method', 'extra'), [
    ('trident', {'refinement.minimal_area': 4, 'refinement.sam_iou_thresh': -1e9, 'refinement.coarse_thresh': 0.0}),
    ('proxy', {}),
])
def test_backend_onnxruntime_labels_as_torch(tmp_path, method, extra):
    """Labels equal on >= 99.9 % of the pixels and dense cosine >= 0.9999 per token; trident's refinement keeps
    every mask (so the decoder graph decides labels) and every stage of it ran its graph (a CLIP-only rule end to end:
    test_trident_segment_backend_onnxruntime).
    """
    pytest.importorskip('onnxruntime')
    from trident_ros.models import load_models
    from trident_ros.pipeline import TridentPipeline

    values = {**TINY, 'method': method, 'models.engine_cache_dir': str(tmp_path), **extra}
    torch_config = TridentConfig.from_mapping(values)
    models = load_models(torch_config)
    reference = TridentPipeline(torch_config, models)
    exported = TridentPipeline(TridentConfig.from_mapping({**values, 'models.backend': 'onnxruntime'}), models)
    ran: list[str] = []
    run = exported.graphs.run
    exported.graphs.run = lambda kind, *inputs: ran.append(kind) or run(kind, *inputs)
    image = kitchen()
    vocabulary = reference.encode_vocabulary('wall, floor, table, chair, cup, window')
    expected_features, features = reference.encode_image(image), exported.encode_image(image)
    expected, actual = reference.label(expected_features, vocabulary), exported.label(features, vocabulary)
    cosine = F.cosine_similarity(features.dense.flatten(1), expected_features.dense.flatten(1), dim=0)
    assert float(cosine.min()) >= 0.9999
    assert np.mean(actual.labels == expected.labels) >= 0.999
    assert set(ran) == {kind for kind, _ in exported.method.graphs(exported.config)}
    assert len(list(tmp_path.glob('*.onnx'))) == len(set(ran))


@pytest.mark.onnx
def test_a_stage_without_its_graph_runs_on_torch_and_says_so_once(tmp_path, caplog):
    """Maskclip's whole-image preset exports nothing (a grid per frame size); a crop changed after loading finds no
    graph for it: torch runs that stage, one INFO line each.
    """
    pytest.importorskip('onnxruntime')
    from trident_ros.pipeline import TridentPipeline

    caplog.set_level(logging.INFO, logger='trident_ros.runtime')
    config = TridentConfig.from_mapping({**TINY, 'method': 'maskclip', 'models.backend': 'onnxruntime',
                                         'models.engine_cache_dir': str(tmp_path)})
    pipeline = TridentPipeline(config)
    assert pipeline.graphs.sessions == {} and not list(tmp_path.iterdir())
    assert any('no exported graphs' in record.message for record in caplog.records)
    graphs = OnnxGraphs({'clip_rule_sclip': (224, object())}, torch.device('cpu'))
    caplog.clear()
    assert graphs.has('clip_rule_sclip', 224)
    assert not graphs.has('clip_rule_sclip', 448) and not graphs.has('clip_rule_sclip', 448)
    assert not graphs.has('sam_fused')
    messages = [record.message for record in caplog.records]
    assert messages == ['graph clip_rule_sclip exported for crop 224, not 448: that stage runs on torch',
                        'graph sam_fused not exported: that stage runs on torch']


def test_graph_file_names_carry_kind_crop_precision_and_weights_hash():
    layer = torch.nn.Linear(3, 2)
    key = GraphKey('clip_guided', 336, 'fp32', weights_hash(layer))
    assert key.file_name == f'clip_guided-336-fp32-{key.weights[:16]}.onnx'
    assert GraphKey('sam_fused', 0, 'fp16', 'ab' * 32).file_name == 'sam_fused-fp16-abababababababab.onnx'
    assert weights_hash(layer) == weights_hash(layer)
    assert weights_hash(layer, '(1, 441, 768)') != weights_hash(layer, '(1, 1764, 768)')
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3
    assert weights_hash(layer) != key.weights


@pytest.mark.onnx
def test_export_reuses_the_file_of_an_existing_key(tmp_path):
    pytest.importorskip('onnx')
    from trident_ros.models import load_models
    from trident_ros.runtime.export import export_graph

    models = load_models(TridentConfig.from_mapping({**TINY, 'method': 'sclip'}))
    path = export_graph('clip_rule_sclip', models, 224, tmp_path)
    sidecar = json.loads(path.with_suffix('.json').read_text())
    assert sidecar['kind'] == 'clip_rule_sclip' and sidecar['crop'] == 224 and sidecar['opset'] == 17
    assert sidecar['dynamic_axes'] == {'crops': 'N', 'features': 'N'} and sidecar['bytes'] == path.stat().st_size
    stamp = path.stat().st_mtime_ns
    assert export_graph('clip_rule_sclip', models, 224, tmp_path) == path and path.stat().st_mtime_ns == stamp
    assert export_graph('clip_rule_sclip', models, 448, tmp_path) != path


def test_a_tensorrt_cache_of_another_stack_is_removed_with_a_warning(tmp_path, caplog):
    folder = tensorrt_cache_dir(tmp_path, STACK)
    assert folder == tmp_path / 'tensorrt' / '10.3.0-Orin'
    assert not prepare_tensorrt_cache(folder, STACK)
    engine = folder / 'TensorrtExecutionProvider_TRTKernel_graph_1.engine'
    engine.write_bytes(b'engine')
    assert not prepare_tensorrt_cache(folder, STACK) and engine.exists()  # same stack: kept
    assert stale_reason(STACK, STACK) is None
    newer = {**STACK, 'onnxruntime': '1.24.0'}
    assert stale_reason(STACK, newer) == "onnxruntime '1.23.0' -> '1.24.0'"
    with caplog.at_level(logging.WARNING, logger='trident_ros.runtime'):
        assert prepare_tensorrt_cache(folder, newer)
    assert not engine.exists() and json.loads((folder / 'stack.json').read_text()) == newer
    assert 'built for another stack' in caplog.records[-1].message
    (folder / 'stack.json').write_text('not json')
    engine.write_bytes(b'engine')
    assert prepare_tensorrt_cache(folder, newer) and not engine.exists()  # an unreadable record is stale too


def test_providers_in_order_the_missing_dropped_with_one_info(caplog):
    assert parse_providers('tensorrt, cuda,cpu') == ['TensorrtExecutionProvider', 'CUDAExecutionProvider',
                                                     'CPUExecutionProvider']
    with pytest.raises(ValueError, match='comma-separated'):
        parse_providers('tensorrt,gpu')
    with caplog.at_level(logging.INFO, logger='trident_ros.runtime'):
        kept = available_providers('tensorrt,cuda,cpu', ['CUDAExecutionProvider', 'CPUExecutionProvider'])
    assert kept == ['CUDAExecutionProvider', 'CPUExecutionProvider']
    assert len(caplog.records) == 1 and 'TensorrtExecutionProvider' in caplog.records[0].message
    assert available_providers('tensorrt', ['CPUExecutionProvider']) == ['CPUExecutionProvider']


def test_backend_and_providers_are_checked():
    assert TridentConfig().models.backend == 'torch'
    assert TridentConfig().models.ort_providers == 'tensorrt,cuda,cpu'
    with pytest.raises(ConfigError, match='models.backend'):
        TridentConfig.from_mapping({'models.backend': 'tensorrt'})
    with pytest.raises(ConfigError, match='models.ort_providers'):
        TridentConfig.from_mapping({'models.ort_providers': 'cuda,npu'})


@pytest.mark.onnx
def test_trident_export_writes_the_method_s_graphs(tmp_path, capsys):
    pytest.importorskip('onnx')
    from trident_ros.tools.export import main

    assert main(['--method', 'clearclip', '--random-weights', '--tiny', '--device', 'cpu',
                 '--engine-cache-dir', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob('clip_rule_clearclip-448-fp32-*.onnx')
    assert f'clip_rule_clearclip: {path}' in out and 'dynamic axes crops[0]=N, features[0]=N' in out
    assert main(['--method', 'cliptrase', '--random-weights', '--tiny', '--engine-cache-dir', str(tmp_path)]) == 0
    assert 'exports no graph' in capsys.readouterr().out
    assert main(['--tiny', '--engine-cache-dir', str(tmp_path)]) == 2


@pytest.mark.onnx
def test_trident_segment_backend_onnxruntime(tmp_path):
    """``trident-segment --backend onnxruntime --engine-cache-dir DIR`` exports into DIR and labels as torch does."""
    pytest.importorskip('onnxruntime')
    from trident_ros.tools.segment import main

    image = tmp_path / 'kitchen.png'
    cv2.imwrite(str(image), cv2.cvtColor(kitchen(), cv2.COLOR_RGB2BGR))
    common = [str(image), '-v', 'wall, floor, table', '--method', 'sclip', '--random-weights', '--tiny',
              '--device', 'cpu']
    assert main([*common, '-o', str(tmp_path / 'torch')]) == 0
    assert main([*common, '-o', str(tmp_path / 'onnx'), '--backend', 'onnxruntime',
                 '--engine-cache-dir', str(tmp_path / 'engines')]) == 0
    assert len(list((tmp_path / 'engines').glob('clip_rule_sclip-224-fp32-*.onnx'))) == 1
    (expected,) = (tmp_path / 'torch').glob('*labels*.png')
    (actual,) = (tmp_path / 'onnx').glob('*labels*.png')
    assert np.mean(cv2.imread(str(actual), cv2.IMREAD_UNCHANGED) == cv2.imread(str(expected), cv2.IMREAD_UNCHANGED)) \
        >= 0.999
