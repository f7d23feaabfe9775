"""SC-CLIP (method ``scclip``) against plain restatements of its formulas.

The anomaly detection on planted outliers, the repair, the aggregation, the attention rule, and the
whole calibrated pass on a 12-block CLIP against the reference's order of operations.
"""
from __future__ import annotations

import math

import torch
from clip_helpers import deep_tiny_clip, heads_of, softmax_rows, upstream_stream

from trident_ros.methods.scclip import aggregate, lof_outliers, repair_anomalies, scclip_features, scclip_weights
from trident_ros.stages.clip_blocks import paper_block


def naive_lof(x: torch.Tensor, neighbours: int) -> list[float]:
    """Score of each point: mean over its nearest ``neighbours`` j of kd_i / kd_j (squared distances)."""
    count = x.shape[0]
    distance = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(count)] for i in range(count)]
    nearest = [sorted((d, j) for j, d in enumerate(row) if j != i)[:neighbours] for i, row in enumerate(distance)]
    k_distance = [near[-1][0] for near in nearest]
    return [sum(k_distance[i] / k_distance[j] for _, j in nearest[i]) / neighbours for i in range(count)]


def test_lof_finds_planted_outliers_and_scores_as_the_formula():
    torch.manual_seed(0)
    tokens = torch.randn(1, 60, 8) * 0.5
    planted = [7, 23, 41]
    tokens[0, planted] += torch.randn(3, 8) * 6  # far from everything else
    anomalies, scores = lof_outliers(tokens, neighbours=10, contamination=0.05)
    assert set(torch.nonzero(anomalies[0]).flatten().tolist()) == set(planted)  # 95th percentile: 3 of 60
    torch.testing.assert_close(scores[0].double(), torch.tensor(naive_lof(tokens[0].double(), 10),
                                                                   dtype=torch.float64), atol=1e-5, rtol=1e-4)


def test_repair_replaces_anomalies_by_the_mean_of_normal_neighbours():
    torch.manual_seed(1)
    grid = (3, 4)
    tokens = torch.randn(1, 12, 2)
    anomalies = torch.zeros(1, 12, dtype=torch.bool)
    anomalies[0, [0, 1, 5]] = True  # a corner, an edge cell, an inner cell, neighbouring each other
    repaired = repair_anomalies(tokens, anomalies, grid)
    for cell in range(12):
        row, col = divmod(cell, 4)
        if not anomalies[0, cell]:
            torch.testing.assert_close(repaired[0, cell], tokens[0, cell])
            continue
        around = [r * 4 + c for r in range(row - 1, row + 2) for c in range(col - 1, col + 2)
                  if 0 <= r < 3 and 0 <= c < 4 and (r, c) != (row, col) and not anomalies[0, r * 4 + c]]
        torch.testing.assert_close(repaired[0, cell], tokens[0, around].mean(0))
    lone = torch.ones(1, 4, dtype=torch.bool)  # no normal neighbour: unchanged
    torch.testing.assert_close(repair_anomalies(tokens[:, :4], lone, (2, 2)), tokens[:, :4])


def test_aggregate_zeroes_weak_similarities_and_normalises_rows():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])
    similarity = torch.tensor([[[1.0, 0.3, 0.5], [0.3, 1.0, 0.9], [0.5, 0.9, 1.0]]])
    expected = torch.stack([(1.0 * tokens[0, 0] + 0.5 * tokens[0, 2]) / 1.5,
                            (1.0 * tokens[0, 1] + 0.9 * tokens[0, 2]) / 1.9,
                            (0.5 * tokens[0, 0] + 0.9 * tokens[0, 1] + 1.0 * tokens[0, 2]) / 2.4])
    torch.testing.assert_close(aggregate(tokens, similarity)[0], expected, atol=1e-5, rtol=1e-5)


def test_attention_rule_averages_the_guided_and_key_softmaxes():
    torch.manual_seed(2)
    similarity = torch.rand(1, 5, 5)
    k = torch.randn(1, 2, 5, 4)
    weights = scclip_weights(similarity, k, 0.5)
    mean = similarity.mean()
    for h in range(2):
        for i in range(5):
            logits = [3 * (float(similarity[0, i, j]) - float(mean)) for j in range(5)]
            kept = [math.exp(v) if v >= 0 else 0.0 for v in logits]
            guided = torch.tensor([v / sum(kept) for v in kept], dtype=torch.float64)
            keys = softmax_rows(0.5 * k[0, h].double() @ k[0, h].double().T)[i]
            torch.testing.assert_close(weights[0, h, i].double(), (guided + keys) / 2, atol=1e-6, rtol=1e-5)


def test_scclip_features_follow_the_reference_order_of_operations():
    clip = deep_tiny_clip(seed=1)
    torch.manual_seed(4)
    crops = torch.randn(2, 3, 224, 224)
    ours, grid = scclip_features(clip, crops)
    stream = upstream_stream(clip, crops)
    last = clip.visual.transformer.resblocks[-1]
    unit = torch.nn.functional.normalize
    with torch.inference_mode():
        for b in range(2):  # one crop at a time, as the reference
            x11, x9, x4 = stream[11][b], stream[9][b], stream[4][b]
            anomalies, _ = lof_outliers(x11[None, 1:])
            patches = repair_anomalies(x11[None, 1:], anomalies, grid)[0]
            fixed9 = repair_anomalies(x9[None, 1:], anomalies, grid)[0]
            s9 = unit(fixed9, dim=-1) @ unit(fixed9, dim=-1).T
            s4 = unit(x4[1:], dim=-1) @ unit(x4[1:], dim=-1).T

            def weigh(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                w = torch.where(s < 0.4, torch.zeros_like(s), s)
                return (w / (w.sum(-1, keepdim=True) + 1e-6)) @ x

            def attention(x: torch.Tensor, s9: torch.Tensor = s9) -> torch.Tensor:
                centred = (s9 - s9.mean()) * 3
                guided = softmax_rows(centred.masked_fill(centred < 0, float('-inf')).double())
                per_head = [((guided + softmax_rows(k @ k.T / math.sqrt(32))) / 2) @ v
                            for _, k, v in heads_of(last, x, clip.heads)]
                return last.attn.out_proj(torch.cat(per_head, -1).float())

            z = weigh(s4, attention(weigh(s9, patches)) + 0.3 * x11[:1])
            fused = sum(stream[i][b] for i in range(4, 11))
            z = z + weigh(s4, attention(fused[1:]) + 0.3 * fused[:1])
            expected = unit(clip.visual.ln_post(z) @ clip.visual.proj, dim=-1)
            torch.testing.assert_close(ours[b], expected, atol=1e-4, rtol=1e-3)
    assert grid == (14, 14) and ours.shape == (2, 196, 32)


def test_paper_blocks_map_proportionally_onto_other_depths():
    assert [paper_block(2, b) for b in (4, 9, 11)] == [1, 1, 1]
    assert [paper_block(12, b) for b in (4, 9, 11)] == [4, 9, 11]
    assert [paper_block(24, b) for b in (4, 9, 11)] == [8, 18, 22]
