"""The `method` parameter: CLIP last-block rules against direct formulas, every method end to end on
the small configurations (random weights), model loading per method, and the method benchmark.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch

from trident_ros.config import ConfigError, ModelsConfig, TridentConfig
from trident_ros.methods import names
from trident_ros.methods.base import Frame
from trident_ros.methods.clip_rules import CLIP_RULE_METHODS
from trident_ros.methods.trident import spliced_windows
from trident_ros.models import load_models
from trident_ros.models.weights import WeightsError, fetch_weights
from trident_ros.pipeline import MODEL_FIELDS, TridentPipeline
from trident_ros.stages.clip_attention import (
    RULES,
    LastBlockRule,
    attend,
    clearclip_weights,
    clip_only_features,
    naclip_weights,
    neighbourhood_prior,
    sclip_weights,
)
from trident_ros.stages.splice import splice_windows
from trident_ros.stages.windows import (
    cut_windows,
    dino_guided_attention,
    normalise,
    short_side_size,
    window_input_size,
)
from trident_ros.tools.measure import synthetic_image
from trident_ros.tools.method_bench import benchmark_methods, format_method_table

TINY = TridentConfig(models=ModelsConfig(model_scale='tiny', random_weights=True, device='cpu'))
METHODS = names()
CLIP_ONLY_METHODS = tuple(method.name for method in CLIP_RULE_METHODS)


def dict_of(section: object) -> dict:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}


def tiny(method: str, changes: dict | None = None) -> TridentConfig:
    """The tiny configuration with ``method`` and the plain defaults (no preset), dotted ``changes`` applied."""
    return TridentConfig(method=method, models=TINY.models).replace(changes or {})
EXPECTED_MODELS = {'corrclip': ('clip', 'dino', 'sam'), 'trident': ('clip', 'dino', 'sam'),
                   'trident_fast': ('clip', 'dino', 'sam'), 'proxy': ('clip', 'dino'), 'maskclip': ('clip',),
                   'sclip': ('clip',), 'clearclip': ('clip',), 'naclip': ('clip',), 'cliptrase': ('clip',),
                   'scclip': ('clip',), 'resclip': ('clip',), 'resclip_rcs': ('clip',)}


@pytest.fixture(scope='module')
def image() -> np.ndarray:
    return synthetic_image(160, 120, seed=3)


@pytest.fixture(scope='module')
def clip_models():
    return load_models(tiny('maskclip'))


# --- the attention rules, against direct per-element formulas --------------------------------------

def naive_softmax_rows(logits: list[list[float]]) -> torch.Tensor:
    out = []
    for row in logits:
        exps = [math.exp(value - max(row)) for value in row]
        out.append([value / sum(exps) for value in exps])
    return torch.tensor(out, dtype=torch.float64)


def naive_self_softmax(x: torch.Tensor, scale: float, prior=None) -> torch.Tensor:
    """softmax_j(scale * <x_i, x_j> + prior[i][j]) for one head x (T, hd), element by element."""
    count = x.shape[0]
    logits = [[scale * float(sum(x[i, c] * x[j, c] for c in range(x.shape[1])))
               + (prior(i, j) if prior else 0.0) for j in range(count)] for i in range(count)]
    return naive_softmax_rows(logits)


def test_sclip_rule_is_query_plus_key_correlation():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    scale = 4 ** -0.5
    weights = sclip_weights(q, k, scale)
    assert weights.shape == (2, 3, 5, 5)
    for b in range(2):
        for h in range(3):
            expected = naive_self_softmax(q[b, h], scale) + naive_self_softmax(k[b, h], scale)
            torch.testing.assert_close(weights[b, h].double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.full((2, 3, 5), 2.0))  # two softmaxes, not renormalised


def test_clearclip_rule_is_query_query_attention():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 6, 4)
    weights = clearclip_weights(q, 0.5)
    for h in range(2):
        torch.testing.assert_close(weights[0, h].double(), naive_self_softmax(q[0, h], 0.5), atol=1e-6, rtol=1e-5)


def test_neighbourhood_prior_is_a_gaussian_of_patch_distance_with_a_zero_class_token():
    grid, std = (3, 4), 1.5
    prior = neighbourhood_prior(grid, std)
    assert prior.shape == (13, 13)
    for i in range(13):
        for j in range(13):
            if i == 0 or j == 0:
                expected = 0.0
            else:
                (ri, ci), (rj, cj) = divmod(i - 1, 4), divmod(j - 1, 4)
                expected = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * std ** 2))
            assert prior[i, j].item() == pytest.approx(expected, abs=1e-7)


def test_naclip_rule_is_key_key_attention_plus_the_prior():
    torch.manual_seed(2)
    grid = (2, 3)
    k = torch.randn(1, 2, 7, 4)

    def prior(i: int, j: int) -> float:
        if i == 0 or j == 0:
            return 0.0
        (ri, ci), (rj, cj) = divmod(i - 1, 3), divmod(j - 1, 3)
        return math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * 5.0 ** 2))

    weights = naclip_weights(k, 0.5, grid)  # NACLIP's default std 5
    for h in range(2):
        torch.testing.assert_close(weights[0, h].double(), naive_self_softmax(k[0, h], 0.5, prior),
                                   atol=1e-6, rtol=1e-5)


# --- the whole last block, against a recomputation from the upstream modules -------------------------

def upstream_last_block_input(clip_models, crops: torch.Tensor) -> torch.Tensor:
    """(B, T, D) tokens entering the last block, captured from open_clip's own forward."""
    captured = {}
    block = clip_models.clip.visual.transformer.resblocks[-1]
    hook = block.register_forward_pre_hook(lambda module, args: captured.setdefault('x', args[0]))
    try:
        with torch.inference_mode():
            clip_models.clip.visual(crops)
    finally:
        hook.remove()
    return captured['x']


def direct_softmax(logits: torch.Tensor) -> torch.Tensor:
    exps = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return exps / exps.sum(dim=-1, keepdim=True)


def direct_method(clip_models, x: torch.Tensor, method: str) -> torch.Tensor:
    """The method's last block, head by head, from the block's weights; (B, gh*gw, E) unit vectors."""
    visual = clip_models.clip.visual
    block = visual.transformer.resblocks[-1]
    dim, heads = x.shape[-1], block.attn.num_heads
    hd = dim // heads
    scale = hd ** -0.5
    qkv = torch.nn.functional.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
    q, k, v = qkv.split(dim, dim=-1)
    side = math.isqrt(x.shape[1] - 1)
    prior = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)  # NACLIP, std 5; class token row/col 0
    for i in range(1, x.shape[1]):
        for j in range(1, x.shape[1]):
            (ri, ci), (rj, cj) = divmod(i - 1, side), divmod(j - 1, side)
            prior[i, j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / 50.0)
    outputs = []
    for b in range(x.shape[0]):
        per_head = []
        for h in range(heads):
            qh, kh, vh = (t[b, :, h * hd:(h + 1) * hd].double() for t in (q, k, v))
            if method == 'maskclip':
                weights = torch.eye(x.shape[1], dtype=torch.float64)
            elif method == 'sclip':
                weights = direct_softmax(scale * qh @ qh.T) + direct_softmax(scale * kh @ kh.T)
            elif method == 'clearclip':
                weights = direct_softmax(scale * qh @ qh.T)
            else:
                weights = direct_softmax(scale * kh @ kh.T + prior)
            per_head.append(weights @ vh)
        outputs.append(torch.cat(per_head, dim=-1).float())
    out = block.attn.out_proj(torch.stack(outputs))
    if method in ('maskclip', 'sclip'):  # residual and feed-forward kept
        out = x + out
        out = out + block.mlp(block.ln_2(out))
    features = visual.ln_post(out[:, 1:]) @ visual.proj
    return torch.nn.functional.normalize(features, dim=-1)


@pytest.mark.parametrize('method', CLIP_ONLY_METHODS)
def test_clip_only_features_equal_the_direct_last_block(clip_models, method):
    torch.manual_seed(3)
    crops = torch.randn(2, 3, 224, 224)  # the tiny CLIP's native size (open_clip's forward cannot resize)
    with torch.inference_mode():
        features, grid = clip_only_features(clip_models.clip, crops, method)
        expected = direct_method(clip_models, upstream_last_block_input(clip_models, crops), method)
    assert grid == (14, 14) and features.shape == (2, 196, clip_models.clip.embed_dim)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


def test_vanilla_rule_through_the_same_plumbing_is_the_upstream_block(clip_models):
    """last_block_qkv + attend + out_proj + residual_feed_forward with CLIP's own attention rule
    reproduce open_clip's last block: the pieces the methods reuse are the block's own.
    """
    torch.manual_seed(4)
    crops = torch.randn(1, 3, 48, 64)
    clip = clip_models.clip
    vanilla = LastBlockRule(weights=lambda b: ((b.q * b.scale) @ b.k.transpose(-2, -1)).softmax(-1), residual=True)
    with torch.inference_mode():
        block = clip.last_block_qkv(crops)
        ours = clip.residual_feed_forward(block.x, clip.attention_output(attend(block, vanilla)))
        upstream = clip.last_block(block.x)
    assert block.grid == (3, 4) and block.q.shape == (1, clip.heads, 13, clip.width // clip.heads)
    torch.testing.assert_close(ours, upstream, atol=1e-5, rtol=1e-4)


def test_rules_cover_exactly_the_clip_only_methods():
    assert set(RULES) == set(CLIP_ONLY_METHODS) and set(CLIP_ONLY_METHODS) < set(METHODS)
    with pytest.raises(ValueError, match='not a CLIP-only method'):
        clip_only_features(None, torch.zeros(1, 3, 16, 16), 'trident')


# --- every method end to end ---------------------------------------------------------------------

def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize('method', METHODS)
def test_method_end_to_end(image, method):
    pipeline = TridentPipeline(tiny(method, {'labelling.prob_thd': 0.0}))
    models = pipeline.models
    assert models.loaded == EXPECTED_MODELS[method]
    assert (models.dino is None) == ('dino' not in EXPECTED_MODELS[method])
    assert (models.sam is None) == ('sam' not in EXPECTED_MODELS[method])
    encoders = [models.clip.visual.conv1]  # the wrappers run the towers' parts, not their forward
    if models.dino is not None:
        encoders.append(models.dino.model.patch_embed.proj)
    if models.sam is not None:
        encoders.append(models.sam.model.image_encoder)
    calls = [count_forwards(module) for module in encoders]

    features = pipeline.encode_image(image)
    assert [c[0] for c in calls] == [1] * len(encoders)  # each loaded image encoder ran once
    height, width = short_side_size(120, 160, TINY.windows.input_short_side, TINY.windows.max_long_side)
    if method in ('trident', 'trident_fast'):
        grid = features.dense.shape[1:]  # the SAM token grid: 256 px input, longest side 256
        assert tuple(grid) == (12, 16)
    else:
        crop = TINY.flat()[pipeline.method.crop_field]
        window_h, window_w = window_input_size(height, width, 16 if method == 'cliptrase' else crop)
        assert tuple(features.dense.shape[1:]) == (window_h // 16, window_w // 16)
    assert features.dense.shape[0] == models.clip.embed_dim and features.dense.dtype == torch.float32
    norms = features.dense.norm(dim=0)
    assert bool((norms <= 1 + 1e-5).all()) and bool((norms > 0.1).all())
    assert (getattr(features.method, 'sam_image', None) is not None) == (method == 'trident')

    vocabulary = pipeline.encode_vocabulary('door, sofa; couch, table')
    seg = pipeline.label(features, vocabulary)
    assert seg.labels.shape == image.shape[:2] and seg.confidence.shape == image.shape[:2]
    assert set(np.unique(seg.labels)) <= {1, 2, 3}  # prob_thd 0: every pixel has a vocabulary label
    assert seg.vocabulary == ['door', 'sofa; couch', 'table']
    assert ('refinement' in seg.timings) == (method == 'trident')
    assert ('aggregation' in seg.timings) == (method in ('trident', 'trident_fast'))

    encoded = pipeline.text_cache.encoded_names
    relabelled = pipeline.label(features, pipeline.encode_vocabulary('table, door, window'))
    assert [c[0] for c in calls] == [1] * len(encoders)  # relabelling ran no image encoder
    assert pipeline.text_cache.encoded_names == encoded + 1  # only 'window' was new
    assert relabelled.vocabulary == ['table', 'door', 'window']


def test_clip_only_dense_is_the_average_of_per_window_unit_features(image):
    """Where windows overlap, the dense map is the mean of the windows' L2-normalised features, so
    logits are the mean of per-window logits, as the references average them.
    """
    config = tiny('sclip', {'windows.clip_slide_crop': 64, 'windows.clip_slide_stride': 32,
                            'windows.input_short_side': 80})
    pipeline = TridentPipeline(config)
    dense = pipeline.encode_image(image).dense
    window_h, window_w = window_input_size(*short_side_size(120, 160, 80, config.windows.max_long_side), 64)
    assert tuple(dense.shape[1:]) == (window_h // 16, window_w // 16)
    resized, boxes, crops = cut_windows(image, 80, config.windows.max_long_side, 64, 32, 16, torch.device('cpu'))
    assert tuple(resized.shape[1:]) == (window_h, window_w) and len(boxes) > 2
    clip = pipeline.models.clip
    features, _ = clip_only_features(clip, normalise(crops, clip.mean, clip.std, torch.float32), 'sclip')
    total = torch.zeros_like(dense)
    count = torch.zeros(dense.shape[1:])
    for (y0, x0, _, _), window in zip(boxes, features, strict=True):
        for token in range(16):
            row, col = y0 // 16 + token // 4, x0 // 16 + token % 4
            total[:, row, col] += window[token]
            count[row, col] += 1
    assert count.min() >= 1 and count.max() > 1  # every cell covered, some by several windows
    torch.testing.assert_close(dense, total / count, atol=1e-6, rtol=1e-5)


def test_proxy_takes_the_dino_similarity_mean_per_window(image):
    """ProxyCLIP runs one window at a time, so mean(S) is per window (Trident: one mean per frame)."""
    config = tiny('proxy', {'windows.slide_crop': 64, 'windows.slide_stride': 32, 'windows.input_short_side': 80})
    pipeline = TridentPipeline(config)
    models = pipeline.models
    params = config.section('proxy')
    frame = Frame(image=image, config=config, models=models, stage=lambda name: contextlib.nullcontext(), patch=16,
                  timings={})
    with torch.inference_mode():
        spliced = spliced_windows(frame, params.beta, params.gamma, mean_per_crop=True)
    resized, boxes, crops = cut_windows(image, 80, config.windows.max_long_side, 64, 32, 16, torch.device('cpu'))
    assert len(boxes) > 2
    dino = models.dino.patch_features(normalise(crops, models.dino.mean, models.dino.std, torch.float32))
    values, clip_grid = models.clip.last_block_values(normalise(crops, models.clip.mean, models.clip.std,
                                                                 torch.float32))
    dino_grid = (64 // models.dino.patch_size,) * 2

    def spliced_with(attended: torch.Tensor) -> torch.Tensor:
        tokens = models.clip.attention_output(attended).transpose(1, 2).reshape(len(boxes), -1, *dino_grid)
        patch = 64 // dino_grid[0]
        return splice_windows(tokens, boxes, (resized.shape[1] // patch, resized.shape[2] // patch), patch)

    one_at_a_time = torch.cat([dino_guided_attention(dino[i:i + 1], values[i:i + 1], clip_grid, dino_grid,
                                                     params.beta, params.gamma) for i in range(len(boxes))])
    torch.testing.assert_close(spliced, spliced_with(one_at_a_time), atol=1e-5, rtol=1e-5)
    per_frame = dino_guided_attention(dino, values, clip_grid, dino_grid, params.beta, params.gamma)
    assert not torch.allclose(spliced, spliced_with(per_frame), atol=1e-4, rtol=1e-4)


def test_trident_fast_is_trident_without_refinement(image):
    fast = TridentPipeline(tiny('trident_fast')).segment(image, 'door, chair')
    unrefined = TridentPipeline(TINY.replace({'refinement.refine': False})).segment(image, 'door, chair')
    assert np.array_equal(fast.labels, unrefined.labels)
    np.testing.assert_array_equal(fast.confidence, unrefined.confidence)


def test_method_needs_a_reload_and_windows_apply_live():
    pipeline = TridentPipeline(TridentConfig.from_mapping({'method': 'maskclip', 'models': dict_of(TINY.models)}))
    assert 'method' in MODEL_FIELDS
    changed = pipeline.config.replace({'method': 'sclip', 'windows.clip_slide_stride': 64})
    assert changed.windows.input_short_side == 336  # sclip's preset, for the next configure
    assert pipeline.apply_label_config(changed) == ['method']
    assert pipeline.config.method == 'maskclip' and pipeline.config.windows.clip_slide_stride == 64
    assert pipeline.config.windows.input_short_side == 512  # the new method's preset is not applied live


def test_pipeline_refuses_models_its_method_lacks(clip_models):
    with pytest.raises(ConfigError, match="method='proxy' needs dino"):
        TridentPipeline(tiny('proxy'), models=clip_models)


def test_config_validates_the_method_and_clip_windows(clip_models):
    with pytest.raises(ConfigError) as error:
        TridentConfig(method='bogus')
    assert 'method' in str(error.value) and all(m in str(error.value) for m in METHODS)
    with pytest.raises(ConfigError, match='windows.clip_slide_stride'):
        TridentConfig.from_mapping({'windows': {'clip_slide_crop': 224, 'clip_slide_stride': 240}})
    with pytest.raises(ConfigError, match=r'windows.clip_slide_crop=200: must be a multiple of 16.*clip /16'):
        TridentPipeline(tiny('sclip', {'windows.clip_slide_crop': 200, 'windows.clip_slide_stride': 100}),
                        models=clip_models)  # the crop is checked against the loaded CLIP's patch size
    assert TridentConfig().method == 'trident'
    assert TridentConfig.from_mapping({'method': 'naclip'}).method == 'naclip'


def test_fetch_weights_asks_only_for_the_method_s_files(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    clip, dino, sam = 'open_clip_model.safetensors', 'vit_base_patch16_224.dino', 'sam_vit_b_01ec64.pth'
    for method, named, not_named in (('maskclip', [clip], [dino, sam]), ('proxy', [clip, dino], [sam]),
                                      ('trident', [clip, dino, sam], [])):
        with pytest.raises(WeightsError) as error:
            fetch_weights(TridentConfig(method=method, models=ModelsConfig(weights_dir=str(tmp_path / 'weights'),
                                                                           download=False)))
        text = str(error.value)
        assert all(word in text for word in named), (method, text)
        assert not any(word in text for word in not_named), (method, text)


# --- the benchmark -------------------------------------------------------------------------------

def test_benchmark_methods_rows_and_table():
    rows = benchmark_methods(synthetic_image(96, 64), repeat=1, warmup=0, tiny=True, device='cpu',
                             methods=('trident', 'clearclip'))
    assert [row['method'] for row in rows] == ['trident', 'clearclip']
    assert rows[0]['ratio_to_trident'] == 1.0
    assert rows[1]['ratio_to_trident'] == pytest.approx(rows[1]['full_frame_s'] / rows[0]['full_frame_s'])
    assert rows[0]['models'] == ['clip', 'dino', 'sam'] and rows[1]['models'] == ['clip']
    assert rows[0]['sam_refinement'] and not rows[1]['sam_refinement']
    assert rows[0]['windows'] == '336/224' and rows[1]['windows'] == '224/112'
    for row in rows:
        assert row['full_frame_s'] > 0 and row['peak_memory_bytes'] > 2**20 and row['memory_measure'] == 'peak RSS'
        assert 0 < row['relabel_s'] < row['full_frame_s'] and not row['preset']
        assert 'labelling' in row['stages_s'] and ('sam_encoder' in row['stages_s']) == (row['method'] == 'trident')
    table = format_method_table(rows).splitlines()
    assert len(table) == 8 and table[3].startswith('trident ') and table[4].startswith('clearclip ')
    assert 'clip+dino+sam' in table[3] and '1.000' in table[3] and table[-1].startswith('clearclip     stages (ms)')
    with pytest.raises(ValueError, match='unknown methods'):
        benchmark_methods(synthetic_image(32, 32), methods=('fastest',))
