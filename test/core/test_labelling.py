"""Labelling: probabilities, label image, class masks and the overlay, against direct formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trident_ros import labelling
from trident_ros.labelling import ClassMask, Segmentation, class_masks, class_probabilities, label_map
from trident_ros.visualization import class_colors, colorize
from trident_ros.vocabulary import Vocabulary


def random_vocabulary(classes: list[list[str]], dim: int, seed: int = 0) -> Vocabulary:
    generator = torch.Generator().manual_seed(seed)
    names = [name for synonyms in classes for name in synonyms]
    return Vocabulary(classes=classes, names=['; '.join(c) for c in classes],
                      text_features=F.normalize(torch.randn(len(names), dim, generator=generator), dim=-1),
                      name_to_class=torch.tensor([k for k, c in enumerate(classes) for _ in c]))


def direct_probabilities(dense, vocabulary, out_size, logit_scale):
    """Reference order: per-name logits, bilinear upsampling, softmax over all names, max per class."""
    logits = torch.einsum('ehw,ne->nhw', dense, vocabulary.text_features)
    logits = F.interpolate(logits[None], size=out_size, mode='bilinear', align_corners=False)[0]
    per_name = (logit_scale * logits).softmax(dim=0)
    return torch.stack([per_name[vocabulary.name_to_class == k].max(dim=0).values
                        for k in range(vocabulary.num_classes)])


@pytest.mark.parametrize('chunk', [64, 2])
def test_probabilities_match_direct_formula(monkeypatch, chunk):
    monkeypatch.setattr(labelling, 'NAME_CHUNK', chunk)  # chunking over names must not change the result
    classes = [['sofa', 'couch', 'settee'], ['door'], ['floor', 'ground'], ['wall']]
    vocabulary = random_vocabulary(classes, dim=16)
    dense = F.normalize(torch.randn(16, 5, 7, generator=torch.Generator().manual_seed(1)), dim=0)
    probs = class_probabilities(dense, vocabulary, (13, 17), logit_scale=40.0)
    expected = direct_probabilities(dense, vocabulary, (13, 17), 40.0)
    assert probs.shape == (4, 13, 17) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_synonyms_max_over_own_names_softmax_over_all():
    # one pixel, 2-d features: class 0 has names at angles 0 and 90 degrees, class 1 one name at 45
    vocabulary = Vocabulary(classes=[['a', 'b'], ['c']], names=['a; b', 'c'],
                            text_features=torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]),
                            name_to_class=torch.tensor([0, 0, 1]))
    dense = torch.tensor([0.8, 0.6]).view(2, 1, 1)
    probs = class_probabilities(dense, vocabulary, (1, 1), logit_scale=10.0)[:, 0, 0]
    exps = torch.exp(10.0 * torch.tensor([0.8, 0.6, 0.96]))
    total = exps.sum()
    torch.testing.assert_close(probs, torch.stack([exps[0] / total, exps[2] / total]))
    assert probs.sum() < 1  # not a softmax over classes: the synonym 'b' takes its share


def test_label_map_threshold_and_dtype():
    probs = torch.tensor([[[0.7, 0.1], [0.3, 0.25]],
                          [[0.2, 0.8], [0.3, 0.5]],
                          [[0.1, 0.1], [0.4, 0.25]]])
    labels, confidence = label_map(probs, prob_thd=0.45)
    np.testing.assert_array_equal(labels, [[1, 2], [0, 2]])
    assert labels.dtype == np.uint8
    np.testing.assert_allclose(confidence, [[0.7, 0.8], [0.4, 0.5]])
    assert confidence.dtype == np.float32
    labels, _ = label_map(probs, prob_thd=0.0)
    np.testing.assert_array_equal(labels, [[1, 2], [3, 2]])


@pytest.mark.parametrize('num_classes, dtype', [(255, np.uint8), (256, np.uint16), (1000, np.uint16)])
def test_label_map_dtype_past_255_classes(num_classes, dtype):
    probs = torch.zeros(num_classes, 2, 3)
    probs[-1, 1, 2] = 0.9
    probs[0, 0, 0] = 0.9
    labels, _ = label_map(probs, prob_thd=0.5)
    assert labels.dtype == dtype
    assert labels[1, 2] == num_classes and labels[0, 0] == 1 and labels.sum() == num_classes + 1


def test_class_masks_match_numpy():
    rng = np.random.default_rng(0)
    labels = np.zeros((23, 31), dtype=np.uint16)
    labels[3:9, 4:20] = 1
    labels[15:22, 25:30] = 3
    labels[10, 0] = 3
    labels[rng.random(labels.shape) < 0.05] = 5
    confidence = rng.random(labels.shape).astype(np.float32)
    names = ['a', 'b', 'c', 'd', 'e', 'f']
    masks = class_masks(labels, confidence, names)
    present = sorted(set(np.unique(labels).tolist()) - {0})
    assert [m.class_id for m in masks] == present == [1, 3, 5]
    for m in masks:
        assert isinstance(m, ClassMask)
        full = labels == m.class_id
        ys, xs = np.nonzero(full)
        x, y = xs.min(), ys.min()
        assert m.bbox == (x, y, xs.max() - x + 1, ys.max() - y + 1)
        assert m.label == names[m.class_id - 1]
        assert m.area == full.sum()
        assert m.score == pytest.approx(confidence[full].mean(), rel=1e-6)
        assert m.mask.dtype == bool and m.mask.shape == (m.bbox[3], m.bbox[2])
        np.testing.assert_array_equal(m.mask, full[y:y + m.bbox[3], x:x + m.bbox[2]])


def test_class_mask_scores_from_class_probabilities():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(9, 11)).astype(np.uint8)
    probs = torch.from_numpy(rng.random((3, 9, 11)).astype(np.float32))
    masks = class_masks(labels, probs, ['a', 'b', 'c'])
    assert [m.class_id for m in masks] == [1, 2, 3]
    for m in masks:
        expected = probs[m.class_id - 1].numpy()[labels == m.class_id].mean()
        assert m.score == pytest.approx(expected, rel=1e-6)


def test_class_masks_empty_and_invalid():
    assert class_masks(np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.float32), ['a']) == []
    with pytest.raises(ValueError, match='no name'):
        class_masks(np.full((2, 2), 2, np.uint8), np.zeros((2, 2), np.float32), ['a'])


def test_palette_fixed_and_distinct():
    colors = class_colors(1000)
    assert colors.shape == (1001, 3) and colors.dtype == np.uint8
    assert colors[0].tolist() == [0, 0, 0] and colors[1].tolist() == [128, 0, 0] and colors[2].tolist() == [0, 128, 0]
    assert len({tuple(c) for c in colors}) == 1001
    np.testing.assert_array_equal(class_colors(3), colors[:4])


def segmentation_of(labels: np.ndarray, names: list[str]) -> Segmentation:
    confidence = np.ones(labels.shape, np.float32)
    return Segmentation(labels=labels, confidence=confidence, masks=class_masks(labels, confidence, names),
                        vocabulary=names)


def test_overlay_blends_and_draws_legend():
    height, width = 120, 160
    labels = np.zeros((height, width), np.uint8)
    labels[60:, :80] = 1
    labels[60:, 80:] = 3
    seg = segmentation_of(labels, ['sofa', 'door', 'floor'])
    image = np.full((height, width, 3), 100, np.uint8)
    out = seg.overlay(image, alpha=0.5)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    colors = seg.colors
    # away from the legend: labelled pixels blended, unlabeled ones untouched
    np.testing.assert_array_equal(out[100, 40], np.round(0.5 * 100 + 0.5 * colors[1].astype(float)))
    np.testing.assert_array_equal(out[100, 120], np.round(0.5 * 100 + 0.5 * colors[3].astype(float)))
    np.testing.assert_array_equal(out[40, 120], image[40, 120])
    # legend at the top-left: swatches of the two present classes (not of 'door'), white text
    legend = out[:40, :80].reshape(-1, 3)
    for class_id, present in ((1, True), (3, True), (2, False)):
        assert np.all(legend == colors[class_id], axis=1).any() == present
    assert (legend.min(axis=1) > 200).sum() > 10
    np.testing.assert_array_equal(image, 100)  # the input is not modified


def test_overlay_alpha_zero_only_legend_changes():
    labels = np.zeros((64, 64), np.uint8)
    labels[32:, :] = 2
    seg = segmentation_of(labels, ['a', 'b'])
    image = np.zeros((64, 64, 3), np.uint8)
    out = seg.overlay(image, alpha=0.0)
    changed = np.nonzero(out.any(axis=2))
    assert changed[0].size > 0 and changed[0].max() < 20 and changed[1].max() < 64
    np.testing.assert_array_equal(seg.color_image(), colorize(labels, class_colors(2)))
    with pytest.raises(ValueError):
        seg.overlay(np.zeros((10, 10, 3), np.uint8))


def test_legend_overflow_becomes_more_entry():
    labels = np.kron(np.arange(1, 41, dtype=np.uint8).reshape(4, 10), np.ones((30, 8), np.uint8))  # 120 x 80
    seg = segmentation_of(labels, [f'class {i}' for i in range(40)])
    out = seg.overlay(np.zeros((120, 80, 3), np.uint8), alpha=0.0).reshape(-1, 3)
    drawn = [class_id for class_id in range(1, 41) if np.all(out == seg.colors[class_id], axis=1).any()]
    assert 1 <= len(drawn) < 40 and drawn == list(range(1, len(drawn) + 1))  # the first ones, then '+N more'


def test_label_map_does_not_threshold_exempt_pixels():
    """SAM-refined pixels keep their argmax label even below prob_thd (as in the reference)."""
    probs = torch.tensor([[[0.1, 0.1]], [[0.05, 0.05]]])  # (K=2, H=1, W=2): best 0.1 < prob_thd
    exempt = torch.tensor([[True, False]])
    labels, _ = label_map(probs, 0.2, exempt=exempt)
    assert labels.tolist() == [[1, 0]]
