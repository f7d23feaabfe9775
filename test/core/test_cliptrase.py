"""CLIPtrase (method ``cliptrase``) against plain restatements of its formulas.

DBSCAN against a sequential DBSCAN, the cluster map and vote on constructed inputs, the pipeline's vote.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from clip_helpers import deep_tiny_clip, heads_of, softmax_rows, upstream_stream

from trident_ros.config import TridentConfig
from trident_ros.methods.cliptrase import (
    cliptrase_pass,
    cliptrase_weights,
    cluster_map,
    cluster_vote,
    dbscan,
    dbscan_defaults,
    median_filter,
    remove_global_patch,
    self_correlation,
)
from trident_ros.pipeline import TridentPipeline
from trident_ros.tools.bench import synthetic_image


def sequential_dbscan(points: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN as scikit-learn runs it.

    Visit points in order, grow a cluster from each unlabelled core point; a border point stays in
    the first cluster that reaches it.
    """
    distance = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    neighbours = [np.flatnonzero(row <= eps) for row in distance]
    labels = np.full(len(points), -1)
    cluster = 0
    for start in range(len(points)):
        if labels[start] != -1 or len(neighbours[start]) < min_samples:
            continue
        labels[start] = cluster
        stack = [start]
        while stack:
            point = stack.pop()
            for other in neighbours[point]:
                if labels[other] == -1:
                    labels[other] = cluster
                    if len(neighbours[other]) >= min_samples:
                        stack.append(other)
        cluster += 1
    return labels


def test_self_correlation_is_the_head_mean_of_three_cosine_maps():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    ours = self_correlation(q, k, v)
    expected = torch.zeros(5, 5, dtype=torch.float64)
    for h in range(2):
        for x in (q, k, v):
            for i in range(5):
                for j in range(5):
                    a, b = x[0, h, i].double(), x[0, h, j].double()
                    expected[i, j] += (a @ b / (a.norm() * b.norm())) / 3 / 2
    torch.testing.assert_close(ours[0].double(), expected, atol=1e-6, rtol=1e-5)


def test_last_block_rule_is_three_self_softmaxes():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    weights = cliptrase_weights(q, k, v, 0.5)
    for h in range(2):
        expected = sum(softmax_rows(0.5 * x[0, h].double() @ x[0, h].double().T) for x in (q, k, v))
        torch.testing.assert_close(weights[0, h].double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.full((1, 2, 6), 3.0))


def test_global_patch_removal_subtracts_the_class_row_and_clips_at_zero():
    correlation = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.1], [0.2, 0.9, 1.0]])
    expected = torch.tensor([[max(0, 1.0 - 0.5), max(0, 0.1 - 0.2)], [max(0, 0.9 - 0.5), max(0, 1.0 - 0.2)]])
    torch.testing.assert_close(remove_global_patch(correlation), expected)


@pytest.mark.parametrize('seed', range(8))
def test_dbscan_labels_points_as_sequential_dbscan(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (4, 3))
    blobs = [rng.normal(centre, 0.3, (25, 3)) for centre in centres]
    points = np.concatenate(blobs + [rng.uniform(-8, 8, (10, 3))])[rng.permutation(110)]
    ours = dbscan(torch.from_numpy(points), 0.5, 4).numpy()
    expected = sequential_dbscan(points, 0.5, 4)
    np.testing.assert_array_equal(ours, expected)
    assert ours.max() >= 1 and (ours == -1).any()  # clusters and noise both occur


def test_dbscan_border_point_joins_the_first_cluster_and_chains_connect():
    # 1-D: a chain 0..4 (step 1) is one cluster; 10 and 12 are cores of a second cluster; 11 is a core;
    # 6 is a border point of the chain only; 20 is noise
    points = torch.tensor([[0.], [1.], [2.], [3.], [4.], [5.5], [10.], [11.], [12.], [20.]])
    labels = dbscan(points, 1.0, 3).tolist()
    assert labels == [0, 0, 0, 0, 0, -1, 1, 1, 1, -1]
    assert labels == sequential_dbscan(points.numpy(), 1.0, 3).tolist()


def test_dbscan_defaults_hit_the_authors_values_and_scale_with_the_patch_count():
    assert dbscan_defaults(196) == (pytest.approx(0.7), 3)
    eps, min_samples = dbscan_defaults(441)  # the authors: 1.1 / 7 at 336 px
    assert eps == pytest.approx(0.7 * 1.5) and abs(eps - 1.1) < 0.06 and min_samples == 7
    assert dbscan_defaults(4 * 196) == (pytest.approx(1.4), 12)


def test_median_filter_mirrors_the_edges():
    torch.manual_seed(2)
    maps = torch.randn(2, 6, 9)
    ours = median_filter(maps, 7)

    def mirror(index: int, length: int) -> int:  # scipy's 'reflect': d c b a | a b c d | d c b a
        while not 0 <= index < length:
            index = -index - 1 if index < 0 else 2 * length - 1 - index
        return index

    for c in range(2):
        for y in range(6):
            for x in range(9):
                values = sorted(float(maps[c, mirror(y + dy, 6), mirror(x + dx, 9)])
                                for dy in range(-3, 4) for dx in range(-3, 4))
                assert ours[c, y, x].item() == pytest.approx(values[24])


def test_cluster_map_splits_the_image_along_constructed_clusters():
    grid = (4, 6)
    left = torch.tensor([[col < 3 for col in range(6)] for _ in range(4)]).reshape(-1).float()
    recalibrated = torch.stack([left if bool(is_left) else 1 - left for is_left in left])  # rows: own half
    clusters = dbscan(recalibrated, 0.5, 3)
    assert set(clusters.tolist()) == {0, 1} and clusters[0] == 0
    mapped = cluster_map(recalibrated, clusters, grid, (40, 60))
    assert mapped.shape == (40, 60) and mapped.dtype == torch.int16
    assert bool((mapped[:, :28] == 0).all()) and bool((mapped[:, 32:] == 1).all())
    assert cluster_map(recalibrated, torch.full((24,), -1), grid, (40, 60)) is None


def test_vote_gives_each_cluster_its_most_frequent_label():
    clusters = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.int16)
    probs = torch.zeros(3, 2, 4)
    best = torch.tensor([[2, 2, 0, 1], [2, 1, 1, 0]])  # cluster 0: 2,2,0,2,1 -> 2; cluster 1: 1,1,0 -> 1
    probs.scatter_(0, best[None], 0.6)
    probs += 0.1
    labels, confidence = cluster_vote(probs, clusters, prob_thd=0.0)
    np.testing.assert_array_equal(labels, [[3, 3, 3, 2], [3, 3, 2, 2]])
    expected = probs.gather(0, torch.from_numpy(labels.astype(np.int64) - 1)[None])[0]
    np.testing.assert_allclose(confidence, expected.numpy())
    labels, _ = cluster_vote(probs, clusters, prob_thd=0.5)  # voted pixels that disagreed keep probability 0.1
    np.testing.assert_array_equal(labels, [[3, 3, 0, 2], [3, 0, 2, 0]])


def test_cliptrase_pass_equals_the_direct_formulas():
    clip = deep_tiny_clip()
    torch.manual_seed(3)
    crop = torch.randn(1, 3, 224, 224)
    result = cliptrase_pass(clip, crop, eps=0.5, min_samples=3)
    stream = upstream_stream(clip, crop)
    blocks = clip.visual.transformer.resblocks
    with torch.inference_mode():
        heads11 = heads_of(blocks[10], stream[10][0], clip.heads)
        correlation = sum(torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).T
                          for qkv in heads11 for x in qkv) / 3 / clip.heads
        recalibrated = (correlation[1:, 1:] - correlation[:1, 1:]).clamp(min=0)
        x = stream[11][0]
        per_head = [sum(softmax_rows(x_h @ x_h.T / math.sqrt(32)) for x_h in (q, k, v)) @ v
                    for q, k, v in heads_of(blocks[11], x, clip.heads)]
        out = x + blocks[11].attn.out_proj(torch.cat(per_head, -1).float())
        out = out + blocks[11].mlp(blocks[11].ln_2(out))
        features = torch.nn.functional.normalize(clip.visual.ln_post(out[1:]) @ clip.visual.proj, dim=-1)
    torch.testing.assert_close(result.recalibrated.double(), recalibrated, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(result.features, features, atol=1e-5, rtol=1e-4)
    assert result.grid == (14, 14)
    np.testing.assert_array_equal(result.clusters.numpy(), sequential_dbscan(result.recalibrated.numpy(), 0.5, 3))


def test_pipeline_votes_within_clusters_on_one_whole_image_pass():
    tiny = {'model_scale': 'tiny', 'random_weights': True, 'device': 'cpu'}
    config = TridentConfig.from_mapping({'method': 'cliptrase', 'models': tiny})
    assert config.windows.whole_image and config.windows.input_short_side == 336
    assert config.labelling.logit_scale == 100.0
    pipeline = TridentPipeline(config)
    image = synthetic_image(160, 120, seed=3)
    features = pipeline.encode_image(image)
    assert features.method.clusters is not None and features.method.clusters.shape == (120, 160)
    windowed = TridentPipeline(config.replace({'windows.whole_image': False}),
                               models=pipeline.models).encode_image(image)
    torch.testing.assert_close(windowed.dense, features.dense)  # cliptrase ignores the windows
    assert len(features.method.clusters.unique()) > 1
    seg = pipeline.label(features, pipeline.encode_vocabulary('door, sofa, table, window'))
    clusters = features.method.clusters.numpy()
    for cluster in np.unique(clusters):
        assert len(np.unique(seg.labels[clusters == cluster])) == 1  # one label per cluster
