"""End to end on small configurations of the real architectures (random weights)."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from trident_ros.config import TridentConfig
from trident_ros.pipeline import TridentPipeline
from trident_ros.tools.measure import synthetic_image

TINY = TridentConfig.from_mapping({'models.model_scale': 'tiny', 'models.random_weights': True, 'models.device': 'cpu'})


@pytest.fixture(scope='module')
def pipeline() -> TridentPipeline:
    return TridentPipeline(TINY)


@pytest.fixture(scope='module')
def image() -> np.ndarray:
    return synthetic_image(160, 120, seed=3)


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize('refine', [False, True])
def test_segmentation_shapes_dtypes_and_labels_from_vocabulary(pipeline, image, refine):
    pipeline.apply_label_config(TINY.replace({'refinement.refine': refine, 'labelling.prob_thd': 0.0}))
    vocabulary = pipeline.encode_vocabulary('door, sofa; couch, table')
    seg = pipeline.label(pipeline.encode_image(image), vocabulary)
    assert seg.labels.shape == image.shape[:2] and seg.labels.dtype == np.uint8
    assert seg.confidence.shape == image.shape[:2] and seg.confidence.dtype == np.float32
    assert seg.confidence.min() >= 0.0 and seg.confidence.max() <= 1.0
    assert seg.vocabulary == ['door', 'sofa; couch', 'table']
    assert set(np.unique(seg.labels)) <= {1, 2, 3}  # prob_thd 0: every pixel labelled, only vocabulary ids
    assert sum(m.area for m in seg.masks) == seg.labels.size
    for mask in seg.masks:
        assert mask.label == seg.vocabulary[mask.class_id - 1]
        x, y, w, h = mask.bbox
        assert mask.mask.shape == (h, w)
        assert np.array_equal(mask.mask, seg.labels[y:y + h, x:x + w] == mask.class_id)
    assert ('refinement' in seg.timings) == refine


def test_deterministic(image):
    first = TridentPipeline(TINY).segment(image, 'door, chair')
    second = TridentPipeline(TINY).segment(image, 'door, chair')
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.confidence, second.confidence)


def test_relabel_runs_no_image_encoder_and_reuses_cached_names(pipeline, image):
    encoders = [pipeline.models.sam.model.image_encoder, pipeline.models.dino.model, pipeline.models.clip.model.visual]
    calls = [count_forwards(m) for m in encoders]
    text_calls = count_forwards(pipeline.models.clip.model.transformer)
    features = pipeline.encode_image(image)
    image_calls = [c[0] for c in calls]
    assert pipeline.models.sam.model.image_encoder and image_calls[0] == 1
    first = pipeline.label(features, pipeline.encode_vocabulary('door, chair'))
    encoded_before = pipeline.text_cache.encoded_names
    relabelled = pipeline.label(features, pipeline.encode_vocabulary('chair, door, window'))
    assert [c[0] for c in calls] == image_calls  # no image encoder ran for the new vocabulary
    assert pipeline.text_cache.encoded_names == encoded_before + 1  # only 'window' was new
    assert relabelled.vocabulary == ['chair', 'door', 'window'] and first.vocabulary == ['door', 'chair']
    text_before = text_calls[0]
    pipeline.encode_vocabulary('door, chair, window')
    assert text_calls[0] == text_before  # every name cached: the text transformer did not run


def test_chunk_size_does_not_change_result(image):
    small = TridentPipeline(TINY.replace({'trident.aggregation_chunk': 7})).segment(image, 'door, chair')
    large = TridentPipeline(TINY.replace({'trident.aggregation_chunk': 100000})).segment(image, 'door, chair')
    assert np.array_equal(small.labels, large.labels)
    np.testing.assert_allclose(small.confidence, large.confidence, atol=1e-5)


def test_unchanged_frames_reuse_the_image_side(image):
    pipeline = TridentPipeline(TINY.replace({'windows.reuse_threshold': 2.0}))
    sam_forwards = count_forwards(pipeline.models.sam.model.image_encoder)
    noise = np.random.default_rng(0).integers(-2, 3, image.shape)  # mean |noise| 1.2 grey levels
    noisy = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
    shifted = np.clip(image.astype(int) + 3, 0, 255).astype(np.uint8)  # mean difference just under 3
    first = pipeline.encode_image(image)
    again = pipeline.encode_image(noisy)
    assert (pipeline.image_encoder_calls, pipeline.image_side_reuses, sam_forwards[0]) == (1, 1, 1)
    assert again.dense is first.dense and set(again.timings) == {'reuse_check'}
    pipeline.encode_image(shifted)  # over the threshold: encoded, and the new reference frame
    pipeline.encode_image(image[:, :-16].copy())  # another size
    assert (pipeline.image_encoder_calls, pipeline.image_side_reuses, sam_forwards[0]) == (3, 1, 3)
    pipeline.apply_label_config(pipeline.config.replace({'windows.slide_stride': 112}))  # a change: encoded again
    pipeline.encode_image(image[:, :-16].copy())
    assert (pipeline.image_encoder_calls, pipeline.image_side_reuses) == (4, 1)
    pipeline.apply_label_config(pipeline.config.replace({'windows.reuse_threshold': 0.0}))  # off: all are encoded
    pipeline.encode_image(image)
    pipeline.encode_image(image)
    assert (pipeline.image_encoder_calls, pipeline.image_side_reuses) == (6, 1)


@pytest.mark.parametrize('method', ['trident', 'proxy', 'naclip'])
def test_bf16_on_the_cpu_is_close_to_fp32(pipeline, image, method):
    fp32 = pipeline if method == 'trident' else TridentPipeline(TINY.replace({'method': method}))
    bf16 = TridentPipeline(fp32.config.replace({'models.bf16': True, 'refinement.refine': True}))
    models = bf16.models
    assert models.dtype == torch.bfloat16 and models.clip.dtype == torch.bfloat16
    if method == 'trident':
        assert models.dino.dtype == models.sam.dtype == torch.bfloat16
        assert models.sam.model.mask_decoder.iou_token.weight.dtype == torch.float32  # prompts stay fp32
    fp32.apply_label_config(fp32.config.replace({'refinement.refine': True}))
    ours, reference = bf16.encode_image(image), fp32.encode_image(image)
    assert ours.dense.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(ours.dense, reference.dense, dim=0)
    assert cosine.min() > 0.999, float(cosine.min())
    seg = bf16.label(ours, bf16.encode_vocabulary('door, sofa; couch, table'))
    assert seg.labels.shape == image.shape[:2]


def test_bad_image_is_refused_with_a_clear_error(pipeline):
    with pytest.raises(ValueError, match=r'\(H, W, 3\) uint8'):
        pipeline.encode_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match='empty image'):
        pipeline.encode_image(np.zeros((0, 10, 3), np.uint8))


def test_cli_writes_overlay_labels_and_json(tmp_path):
    cv2.imwrite(str(tmp_path / 'scene.png'), cv2.cvtColor(synthetic_image(96, 64), cv2.COLOR_RGB2BGR))
    out = tmp_path / 'out'
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.segment',
                             str(tmp_path / 'scene.png'), '-v', 'door, chair',
                             '-o', str(out), '--random-weights', '--tiny', '--device', 'cpu'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'LABELS ARE MEANINGLESS' in result.stderr
    overlay = cv2.imread(str(out / 'scene_overlay.png'))
    labels = cv2.imread(str(out / 'scene_labels.png'), cv2.IMREAD_UNCHANGED)
    summary = json.loads((out / 'scene_masks.json').read_text())
    assert overlay.shape == (64, 96, 3) and labels.shape == (64, 96)
    assert summary['vocabulary'] == ['door', 'chair']
    assert {m['class_id'] for m in summary['masks']} == set(np.unique(labels)) - {0}
    assert sum(m['area'] for m in summary['masks']) == int((labels > 0).sum())


def test_cli_flags_map_to_the_config():
    from trident_ros.tools.segment import build_config, parse_args

    config = build_config(parse_args(['x.png', '-v', 'door', '--bf16', '--no-refine', '--method', 'proxy']))
    assert (config.models.bf16, config.refinement.refine, config.method, config.models.fp16) == (
        True, False, 'proxy', True)
    assert not build_config(parse_args(['x.png', '-v', 'door'])).models.bf16


def test_cli_without_weights_names_the_missing_file_and_the_smoke_mode(tmp_path):
    env_home = {'TRIDENT_WEIGHTS_DIR': str(tmp_path / 'weights'), 'HOME': str(tmp_path),
                'PATH': '/usr/bin:/bin', 'HF_HUB_OFFLINE': '1'}
    cv2.imwrite(str(tmp_path / 'scene.png'), np.zeros((8, 8, 3), np.uint8))
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.segment',
                             str(tmp_path / 'scene.png'), '-v', 'door',
                             '-o', str(tmp_path / 'out'), '--device', 'cpu'],
                            capture_output=True, text=True, timeout=300, env=env_home)
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr
    assert 'random-weights' in result.stderr
    assert str(tmp_path / 'weights') in result.stderr
    for missing in ('sam_vit_b_01ec64.pth', 'vit_base_patch16_224.dino', 'open_clip_model.safetensors'):
        assert missing in result.stderr  # every missing file is named in one message


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason='this machine has a CUDA device 7')
def test_cli_with_an_unavailable_cuda_device_is_a_clear_error(tmp_path):
    cv2.imwrite(str(tmp_path / 'scene.png'), np.zeros((8, 8, 3), np.uint8))
    result = subprocess.run([sys.executable, '-m', 'trident_ros.tools.segment',
                             str(tmp_path / 'scene.png'), '-v', 'door',
                             '-o', str(tmp_path / 'out'), '--device', 'cuda:7', '--random-weights', '--tiny'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr and "device='cuda:7'" in result.stderr
