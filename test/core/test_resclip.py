"""ResCLIP (methods ``resclip``, ``resclip_rcs``) and PAMR against plain restatements.

RCS and SFR matrices on small grids, the patch labels, both passes on a 12-block CLIP, PAMR's
affinity and iteration, and relabelling that runs no image encoder.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from clip_helpers import deep_tiny_clip, gaussian_prior, heads_of, softmax_rows, upstream_stream

from trident_ros.config import TridentConfig
from trident_ros.methods.resclip import (
    ResclipParams,
    mix,
    patch_labels,
    path_stays,
    rcs_attention,
    resclip_first_pass,
    resclip_second_pass,
    sfr_matrix,
)
from trident_ros.pipeline import TridentPipeline
from trident_ros.stages.pamr import pamr_affinity, pamr_refine
from trident_ros.tools.bench import synthetic_image
from trident_ros.vocabulary import Vocabulary


def test_rcs_is_the_mean_of_per_head_query_key_softmaxes():
    torch.manual_seed(0)
    qk = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for _ in range(4)]
    ours = rcs_attention(qk, 0.5)
    for h in range(2):
        expected = sum(softmax_rows(0.5 * q[0, h].double() @ k[0, h].double().T) for q, k in qk) / 4
        torch.testing.assert_close(ours[0, h].double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mix(torch.ones(2), torch.zeros(2), 0.3), torch.full((2,), 2 * 0.7))


def naive_path_stays(labels: list[list[int]], i: int, j: int, most: int) -> bool:
    """ResCLIP's check_path for one pair: ``most + 1`` samples of the segment, the first ``d + 1`` tested."""
    width = len(labels[0])
    (r0, c0), (r1, c1) = divmod(i, width), divmod(j, width)
    steps = max(abs(r1 - r0), abs(c1 - c0))
    for n in range(steps + 1):
        t = torch.tensor(n / most if most else 0.0, dtype=torch.float32)
        r = int(torch.round(r0 * (1 - t) + r1 * t))
        c = int(torch.round(c0 * (1 - t) + c1 * t))
        if labels[r][c] != labels[r0][c0]:
            return False
    return True


def naive_sfr(labels: list[list[int]], std: float) -> torch.Tensor:
    height, width = len(labels), len(labels[0])
    count = height * width
    flat = [labels[i // width][i % width] for i in range(count)]
    steps = [[max(abs(i // width - j // width), abs(i % width - j % width)) for j in range(count)]
             for i in range(count)]
    most = max(max(row) for row in steps)
    m = torch.zeros(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(count):
            value = 1.0 if (flat[i] == flat[j] or i == j) else 0.0
            if not naive_path_stays(labels, i, j, most):
                value *= math.exp(-steps[i][j] / most)
            m[i, j] = value
    taps = min(count, int(6 * std + 1))
    taps += 1 - taps % 2
    kernel = [math.exp(-((n - taps // 2) ** 2) / (2 * std * std)) for n in range(taps)]
    kernel = [w / sum(kernel) for w in kernel]
    blurred = torch.zeros_like(m)
    for i in range(count):
        for j in range(count):
            blurred[i, j] = max(0.0, sum(kernel[n] * float(m[i, j + n - taps // 2])
                                         for n in range(taps) if 0 <= j + n - taps // 2 < count))
    out = torch.zeros(count + 1, count + 1, dtype=torch.float64)
    out[1:, 1:] = blurred / (blurred.sum(1, keepdim=True) + 1e-8)
    return out


def test_sfr_matrix_equals_the_restated_rule_on_a_small_grid():
    labels = [[0, 0, 1, 1, 1], [0, 2, 2, 1, -1], [0, 0, 2, 1, 1], [1, 1, 1, 1, 0]]
    ours = sfr_matrix(torch.tensor(labels), blur_std=1.0)
    torch.testing.assert_close(ours.double(), naive_sfr(labels, 1.0), atol=1e-6, rtol=1e-5)
    assert float(ours[0].abs().sum()) == 0 and float(ours[:, 0].abs().sum()) == 0


def test_path_check_breaks_paths_that_leave_the_label():
    labels = torch.tensor([[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    stays = path_stays(labels)
    assert not bool(stays[0, 2])  # (0,0) -> (0,2) crosses (0,1) of label 1
    assert bool(stays[0, 6]) and bool(stays[3, 5])  # down the left column; across the middle row


def test_patch_labels_take_the_mode_per_patch_and_mark_unsure():
    probs = torch.full((2, 4, 8), 0.1)
    probs[1, :, :4] = 0.9  # patch 0: class 1
    probs[0, :3, 4:] = 0.4  # patch 1: class 0 in 12 pixels, unsure (max 0.1 < 0.2) in 4
    labels = patch_labels(probs, temp_thd=0.2, patch=4)
    assert labels.tolist() == [[1, 0]]
    probs[0, :, 4:] = 0.15
    assert patch_labels(probs, temp_thd=0.2, patch=4).tolist() == [[1, -1]]


def random_vocabulary(count: int, dim: int, seed: int) -> Vocabulary:
    generator = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=-1)
    names = [f'class {i}' for i in range(count)]
    return Vocabulary(classes=[[n] for n in names], names=names, text_features=text,
                      name_to_class=torch.arange(count))


def test_first_pass_is_naclip_mixed_with_rcs_and_the_second_pass_adds_sfr():
    clip = deep_tiny_clip(seed=2)
    torch.manual_seed(5)
    pixels = torch.rand(1, 3, 224, 224)
    crops = (pixels - 0.45) / 0.27
    params = ResclipParams(rcs_lambda=0.3, sfr_tau=2.1, sfr_lambda=0.7, temp_thd=0.25)
    windows = resclip_first_pass(clip, crops, params, with_sfr=True, pixels=pixels)
    stream = upstream_stream(clip, crops)
    blocks = clip.visual.transformer.resblocks
    prior = gaussian_prior(14)
    unit = torch.nn.functional.normalize
    with torch.inference_mode():
        rcs = [sum(softmax_rows(q @ k.T / math.sqrt(32)) for q, k, _ in
                   (heads_of(blocks[b - 1], stream[b - 1][0], clip.heads)[h] for b in range(6, 10))) / 4
               for h in range(clip.heads)]
        last = heads_of(blocks[11], stream[11][0], clip.heads)

        def features(extra: torch.Tensor | None, tau: float, lam: float) -> torch.Tensor:
            per_head = []
            for h, (_, k, v) in enumerate(last):
                logits = k @ k.T / math.sqrt(32)
                if extra is not None:
                    logits = tau * ((1 - lam) * logits + lam * extra)
                weights = 2 * (0.7 * softmax_rows(logits + prior) + 0.3 * rcs[h])
                per_head.append(weights @ v)
            out = blocks[11].attn.out_proj(torch.cat(per_head, -1).float())
            return unit(clip.visual.ln_post(out[1:]) @ clip.visual.proj, dim=-1)

        torch.testing.assert_close(windows.first[0], features(None, 1, 0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(windows.rcs[0].double(), torch.stack(rcs), atol=1e-6, rtol=1e-5)

        vocabulary = random_vocabulary(3, 32, seed=0)
        second = resclip_second_pass(clip, windows, vocabulary, params)
        logits = (windows.first[0] @ vocabulary.text_features.T).T.reshape(1, 3, 14, 14)
        logits = torch.nn.functional.interpolate(logits, size=(224, 224), mode='bilinear', align_corners=False)
        probs = (pamr_refine(logits, pamr_affinity(pixels)) * 40).softmax(dim=1)[0]
        feedback = sfr_matrix(patch_labels(probs, 0.25, 16)).double()
        expected = features(feedback / feedback.max(), 2.1, 0.7)
        torch.testing.assert_close(second[0], expected, atol=1e-4, rtol=1e-3)
        assert (second[0] - windows.first[0]).abs().max() > 1e-2  # the feedback changed the features
        neutral = resclip_second_pass(clip, windows, vocabulary, ResclipParams(0.3, 1.0, 0.0, 0.25))
        torch.testing.assert_close(neutral, windows.first, atol=1e-5, rtol=1e-4)  # no feedback: the first pass


def test_pamr_affinity_and_iteration_as_restated():
    torch.manual_seed(6)
    image = torch.rand(1, 3, 20, 24) * 255
    affinity = pamr_affinity(image, dilations=(1, 2))
    assert affinity.shape == (1, 16, 20, 24)
    torch.testing.assert_close(affinity.sum(1), torch.ones(1, 20, 24))
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]

    def at(y: int, x: int, maps: torch.Tensor) -> torch.Tensor:  # borders replicated
        return maps[..., min(max(y, 0), maps.shape[-2] - 1), min(max(x, 0), maps.shape[-1] - 1)]

    y, x = 0, 5  # a border pixel
    every = torch.stack([at(y + d * dy, x + d * dx, image[0]) for d in (1, 2) for dy, dx in [(0, 0)] + offsets])
    std = every.std(dim=0)
    logits = torch.stack([-((image[0, :, y, x] - at(y + d * dy, x + d * dx, image[0])).abs()
                            / (1e-8 + 0.1 * std)).mean() for d in (1, 2) for dy, dx in offsets])
    torch.testing.assert_close(affinity[0, :, y, x], logits.softmax(0), atol=1e-6, rtol=1e-5)
    maps = torch.randn(1, 2, 20, 24)
    once = pamr_refine(maps, affinity, dilations=(1, 2), iterations=1)
    expected = sum(affinity[0, p, y, x] * at(y + d * dy, x + d * dx, maps[0])
                   for p, (d, (dy, dx)) in enumerate((d, o) for d in (1, 2) for o in offsets))
    torch.testing.assert_close(once[0, :, y, x], expected, atol=1e-6, rtol=1e-5)
    constant = torch.full((1, 1, 20, 24), 3.0)
    torch.testing.assert_close(pamr_refine(constant, affinity, (1, 2)), constant)


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_relabel_reruns_only_the_vocabulary_side():
    image = synthetic_image(160, 120, seed=3)
    base = {'models.model_scale': 'tiny', 'models.random_weights': True, 'models.device': 'cpu'}
    for method in ('resclip', 'resclip_rcs'):
        pipeline = TridentPipeline(TridentConfig.from_mapping({**base, 'method': method}))
        calls = count_forwards(pipeline.models.clip.visual.conv1)
        blocks = [count_forwards(block) for block in pipeline.models.clip.visual.transformer.resblocks[:-1]]
        features = pipeline.encode_image(image)
        assert calls[0] == 1 and all(c[0] == 1 for c in blocks)
        assert (getattr(features.method, 'windows', None) is not None) == (method == 'resclip')
        first = pipeline.label(features, pipeline.encode_vocabulary('door, sofa, table'))
        second = pipeline.label(features, pipeline.encode_vocabulary('window, chair'))
        assert calls[0] == 1 and all(c[0] == 1 for c in blocks)  # no block of the image encoder ran again
        assert ('resclip_sfr' in second.timings) == (method == 'resclip')
        assert first.labels.shape == second.labels.shape == image.shape[:2]
        again = pipeline.label(features, pipeline.encode_vocabulary('door, sofa, table'))
        np.testing.assert_array_equal(again.labels, first.labels)


def test_pamr_at_labelling_refines_the_full_size_logits_from_the_cached_frame():
    from trident_ros.labelling import class_probabilities

    image = synthetic_image(160, 120, seed=3)
    config = TridentConfig.from_mapping({'method': 'naclip', 'models': {'model_scale': 'tiny', 'random_weights': True,
                                                                        'device': 'cpu'}})
    assert config.labelling.pamr  # NACLIP's default
    pipeline = TridentPipeline(config)
    calls = count_forwards(pipeline.models.clip.visual.conv1)
    features = pipeline.encode_image(image)
    vocabulary = pipeline.encode_vocabulary('door, sofa, table')
    seg = pipeline.label(features, vocabulary)
    assert calls[0] == 1 and 'pamr_affinity' in seg.timings
    affinity = pamr_affinity(torch.from_numpy(image).permute(2, 0, 1)[None].float())
    probs = class_probabilities(features.dense, vocabulary, (120, 160), config.labelling.logit_scale,
                                lambda logits: pamr_refine(logits[None], affinity)[0])
    np.testing.assert_allclose(seg.confidence, probs.max(0).values.numpy(), atol=1e-5)
    plain = class_probabilities(features.dense, vocabulary, (120, 160), config.labelling.logit_scale)
    assert not np.allclose(seg.confidence, plain.max(0).values.numpy(), atol=1e-3)
