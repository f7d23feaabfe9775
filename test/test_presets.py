"""Per-method presets of the authors' defaults: they apply unless the user set the field."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from trident_ros.config import METHODS, TridentConfig
from trident_ros.pipeline import drop_small_classes
from trident_ros.presets import METHOD_PRESETS, with_presets


def test_every_method_has_a_valid_preset_of_known_fields():
    fields = {f.name for f in dataclasses.fields(TridentConfig)}
    assert set(METHOD_PRESETS) == set(METHODS)
    for method, preset in METHOD_PRESETS.items():
        assert set(preset) <= fields, method
        config = TridentConfig.from_dict({'method': method})
        for name, value in preset.items():
            assert getattr(config, name) == value, (method, name)


def test_presets_apply_unless_the_user_set_the_field():
    naclip = TridentConfig.from_dict({'method': 'naclip'})
    assert naclip.pamr and naclip.input_short_side == 336 and naclip.prob_thd == 0.0
    mine = TridentConfig.from_dict({'method': 'naclip', 'pamr': False, 'input_short_side': 448})
    assert not mine.pamr and mine.input_short_side == 448 and mine.clip_slide_stride == 112
    proxy = TridentConfig.from_dict({'method': 'proxy'})
    assert (proxy.dino_model, proxy.slide_crop, proxy.slide_stride, proxy.input_short_side) == \
        ('vit_base_patch8_224.dino', 336, 112, 336)
    assert TridentConfig.from_dict({}) == TridentConfig()  # trident: the dataclass defaults
    assert TridentConfig(method='naclip').pamr is False  # the constructor applies no preset
    assert with_presets({'method': 'clearclip', 'logit_scale': 70.0})['logit_scale'] == 70.0


def test_yaml_files_get_the_preset_of_their_method(tmp_path):
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump({'trident': {'ros__parameters': {'method': 'cliptrase', 'logit_scale': 60.0}}}))
    config = TridentConfig.from_yaml(path)
    assert config.whole_image and config.input_short_side == 336 and config.logit_scale == 60.0


def test_area_threshold_drops_classes_on_a_small_share_of_the_pixels():
    probs = torch.zeros(3, 10, 10)
    probs[0] = 0.5
    probs[1, :, :1] = 0.9  # class 1 wins 10 of 100 pixels
    probs[2, 0, 1] = 0.9  # class 2 wins 1 pixel
    kept = drop_small_classes(probs.clone(), 0.05)
    assert float(kept[2].abs().sum()) == 0 and torch.equal(kept[:2], probs[:2])
    assert float(drop_small_classes(probs.clone(), 0.1)[1].abs().sum()) == 0  # at most 10%: dropped
    with pytest.raises(Exception, match='area_thd'):
        TridentConfig(area_thd=1.5)
