"""Parity of every exported graph with the pipeline's own torch code, on tiny random-weight models (fp32, ONNX
Runtime's CPU provider, atol = rtol = 1e-4): batches other than the exported one, two aspect ratios through one SAM
graph, the decoder with 1 and 4 regions, each CLIP-only rule.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

from trident_ros.config import TridentConfig  # noqa: E402
from trident_ros.methods.base import Frame  # noqa: E402
from trident_ros.methods.trident import TridentParams, fused_sam  # noqa: E402
from trident_ros.models import load_models  # noqa: E402
from trident_ros.runtime.export import export_graph  # noqa: E402
from trident_ros.runtime.graphs import spec  # noqa: E402
from trident_ros.runtime.onnx_runtime import OnnxGraphs  # noqa: E402
from trident_ros.stages.clip_attention import RULES, clip_only_features  # noqa: E402
from trident_ros.stages.sam_aggregation import SamAggregation  # noqa: E402
from trident_ros.stages.sam_refinement import Regions, _decode, mask_prompts  # noqa: E402
from trident_ros.stages.windows import dino_guided_attention, normalise  # noqa: E402

pytestmark = pytest.mark.onnx
TOLERANCE = {'atol': 1e-4, 'rtol': 1e-4}
CROP, CLIP_CROP = 336, 224


@pytest.fixture(scope='module')
def models():
    config = TridentConfig.from_mapping({'models.random_weights': True, 'models.model_scale': 'tiny',
                                         'models.device': 'cpu'})
    return load_models(config)


@pytest.fixture(scope='module')
def graphs(models, tmp_path_factory):
    """Every graph of the tiny models, exported once (batch 2), opened on ONNX Runtime's CPU provider."""
    folder = tmp_path_factory.mktemp('engines')
    kinds = {'dino_patches': CROP, 'clip_guided': CROP, 'sam_fused': 0, 'sam_decoder': 0,
             **{f'clip_rule_{rule}': CLIP_CROP for rule in RULES}}
    sessions = {kind: (crop, ort.InferenceSession(str(export_graph(kind, models, crop, folder)),
                                                  providers=['CPUExecutionProvider']))
                for kind, crop in kinds.items()}
    return OnnxGraphs(sessions, models.device)


def crops(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.float(), **TOLERANCE)


def cosine(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(F.cosine_similarity(actual.flatten(1), expected.flatten(1), dim=-1).min())


def test_every_graph_has_the_declared_inputs_outputs_and_dynamic_axes(graphs):
    for kind, (_, session) in graphs.sessions.items():
        graph_spec = spec(kind)
        assert [meta.name for meta in session.get_inputs()] == list(graph_spec.inputs), kind
        assert [meta.name for meta in session.get_outputs()] == list(graph_spec.outputs), kind
        for meta in [*session.get_inputs(), *session.get_outputs()]:
            dynamic = isinstance(meta.shape[0], str)
            assert dynamic == (meta.name in graph_spec.dynamic), (kind, meta.name, meta.shape)


@pytest.mark.parametrize('count', [1, 3])
def test_dino_patches_and_clip_guided_match_the_torch_windows(models, graphs, count):
    """Exported with 2 crops, run with 1 and 3; Trident's frame-wide similarity mean and ProxyCLIP's per crop."""
    batch = crops(count, CROP, seed=count)
    dino = models.dino.patch_features(normalise(batch, models.dino.mean, models.dino.std, models.dtype))
    unit, sums = graphs.run('dino_patches', batch)
    close(unit, F.normalize(dino, dim=-1))
    expected_sums = (F.normalize(dino, dim=-1) @ F.normalize(dino, dim=-1).transpose(1, 2)).sum(dim=(1, 2))
    close(sums, expected_sums)
    values, clip_grid = models.clip.last_block_values(normalise(batch, models.clip.mean, models.clip.std,
                                                                models.dtype))
    dino_grid = (CROP // models.dino.patch_size,) * 2
    pairs = unit.shape[1] ** 2
    for per_crop in (False, True):
        mean = sums / pairs if per_crop else (sums.sum() / (pairs * count)).expand(count)
        tokens = graphs.run('clip_guided', batch, unit, mean * 1.2, torch.tensor([3.0]))[0]
        expected = models.clip.attention_output(dino_guided_attention(dino, values, clip_grid, dino_grid, 1.2, 3.0,
                                                                      mean_per_crop=per_crop))
        close(tokens, expected)


@pytest.mark.parametrize('rule', sorted(RULES))
@pytest.mark.parametrize('count', [1, 3])
def test_each_clip_only_rule_matches_torch(models, graphs, rule, count):
    batch = crops(count, CLIP_CROP, seed=count)
    expected, _ = clip_only_features(models.clip, normalise(batch, models.clip.mean, models.clip.std, models.dtype),
                                     rule)
    actual = graphs.run(f'clip_rule_{rule}', batch)[0]
    close(actual, expected)
    assert cosine(actual, expected) > 0.9999


@pytest.mark.parametrize('size', [(176, 256), (256, 144)])
@pytest.mark.parametrize(('cos_fac', 'refine_neg_cos'), [(1.2, True), (3.0, False)])
def test_sam_fused_matches_the_fused_torch_encoder_and_aggregation(models, graphs, size, cos_fac, refine_neg_cos):
    """One static graph, two aspect ratios (the key mask), both tau rules: SAM's embedding and the dense features
    equal SamEncoder.encode with SamAggregation observing it, then CLIP's projection.
    """
    generator = torch.Generator().manual_seed(size[0])
    image = torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy()
    spliced = torch.randn(models.clip.width, 9, 12, generator=generator)
    sam = models.sam
    valid = sam.token_grid(*size)
    aggregation = SamAggregation(spliced, valid, cos_fac, refine_neg_cos, 64)
    with torch.inference_mode():
        expected_image = sam.encode(image, observer=aggregation)
        expected = F.normalize(models.clip.project(aggregation.result().permute(1, 2, 0)).float(), dim=-1)
    config = TridentConfig.from_mapping({'trident.cos_fac': cos_fac, 'trident.refine_neg_cos': refine_neg_cos})
    frame = Frame(image=image, config=config, models=models, stage=None, patch=16, timings={}, graphs=graphs)
    dense, sam_image = fused_sam(frame, spliced, TridentParams(cos_fac=cos_fac, refine_neg_cos=refine_neg_cos))
    assert dense.shape == (models.clip.embed_dim, *valid)
    close(dense, expected.permute(2, 0, 1))
    assert cosine(dense.flatten(1).t(), expected.reshape(-1, expected.shape[-1])) > 0.9999
    close(sam_image.embedding, expected_image.embedding)
    assert (sam_image.input_size, sam_image.rounded_size) == (expected_image.input_size, expected_image.rounded_size)


@pytest.mark.parametrize('count', [1, 4])
def test_sam_decoder_matches_the_refinement_decode(models, graphs, count):
    """Prompt encoder + mask decoder with 1 and 4 regions (exported with 2), the pipeline's own `_decode`."""
    generator = torch.Generator().manual_seed(count)
    sam = models.sam.model
    frame = (96, 128)
    embedding = torch.randn(1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size,
                            generator=generator)
    corner = torch.rand(count, 2, generator=generator) * 60
    boxes = torch.cat([corner, corner + 20 + torch.rand(count, 2, generator=generator) * 30], dim=1)
    regions = Regions(classes=torch.arange(count) % 2, boxes=boxes, points=corner + 10)
    probs = torch.rand(2, *frame, generator=generator)
    prompts = mask_prompts(probs, (frame[0] * 2, frame[1] * 2), sam.prompt_encoder.mask_input_size, 0.2, 0.005)
    slot = regions.classes

    def decoder(*inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(graphs.run('sam_decoder', *inputs))

    with torch.inference_mode():
        expected_masks, expected_iou = _decode(sam, embedding, regions, prompts, slot, frame)
        masks, iou = _decode(sam, embedding, regions, prompts, slot, frame, decoder)
    assert masks.shape == (count, 1, *sam.prompt_encoder.mask_input_size) and iou.shape == (count,)
    close(masks, expected_masks)
    close(iou, expected_iou)
    assert np.mean(((masks > 0) == (expected_masks > 0)).numpy()) >= 0.999
