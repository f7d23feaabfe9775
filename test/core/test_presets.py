"""Per-method presets of the authors' defaults: they apply unless the user set the field."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from trident_ros.config import METHODS, TridentConfig
from trident_ros.methods.presets import METHOD_PRESETS, with_presets
from trident_ros.pipeline import drop_small_classes


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


def test_headline_configuration_runs_with_a_patch_14_clip():
    """Trident with OpenCLIP ViT-H/14 (config/trident_vit_h14.yaml), at tiny scale.

    A CLIP of patch 14 (24 x 24 tokens per 336 px window) beside DINO's 21 x 21, through the whole pipeline.
    """
    import numpy as np
    from open_clip import CLIP, CLIPTextCfg, CLIPVisionCfg

    from trident_ros.models import ClipDense, load_models
    from trident_ros.pipeline import TridentPipeline
    from trident_ros.tools.bench import synthetic_image

    headline = TridentConfig.from_yaml(Path(__file__).parents[2] / 'config' / 'trident_vit_h14.yaml')
    assert (headline.method, headline.clip_model, headline.clip_pretrained) == ('trident', 'ViT-H-14',
                                                                                 'laion2b_s32b_b79k')
    assert (headline.dino_model, headline.sam_model, headline.slide_crop, headline.slide_stride) == \
        ('vit_base_patch16_224.dino', 'vit_b', 336, 224)
    config = headline.replace(model_scale='tiny', random_weights=True, device='cpu')
    models = load_models(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
        vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=14, image_size=224)
        clip = CLIP(embed_dim=32, text_cfg=text, vision_cfg=vision)
    models.clip = ClipDense(clip.eval())
    grids = []
    models.clip.visual.conv1.register_forward_hook(lambda m, args, out: grids.append(tuple(out.shape[-2:])))
    pipeline = TridentPipeline(config, models=models)
    features = pipeline.encode_image(synthetic_image(160, 120, seed=3))
    assert grids == [(24, 24)] and tuple(features.dense.shape) == (32, 12, 16)
    seg = pipeline.label(features, pipeline.encode_vocabulary('door, chair'))
    assert set(np.unique(seg.labels)) <= {0, 1, 2} and seg.labels.shape == (120, 160)


def test_cli_method_brings_its_preset_and_the_file_wins(tmp_path):
    from trident_ros.tools.segment import build_config, parse_args

    config = build_config(parse_args(['x.png', '-v', 'door', '--method', 'naclip']))
    assert config.pamr and config.input_short_side == 336
    path = tmp_path / 'mine.yaml'
    path.write_text(yaml.safe_dump({'pamr': False, 'method': 'sclip'}))
    config = build_config(parse_args(['x.png', '-v', 'door', '--config', str(path), '--method', 'naclip']))
    assert config.method == 'naclip' and not config.pamr and config.input_short_side == 336


def test_proxy_preset_runs_with_a_patch_8_dino():
    """ProxyCLIP's setting: DINO ViT-B/8 (tiny here), 336/112 windows, short side 336.

    The dense map is on the DINO grid (8 px).
    """
    import numpy as np
    import timm

    from trident_ros.models import DinoPatches, load_models
    from trident_ros.pipeline import TridentPipeline
    from trident_ros.tools.bench import synthetic_image

    config = TridentConfig.from_dict({'method': 'proxy', 'model_scale': 'tiny', 'random_weights': True,
                                      'device': 'cpu'})
    models = load_models(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dino = timm.create_model(config.dino_model, pretrained=False, embed_dim=48, depth=2, num_heads=2,
                                 patch_size=8, img_size=224)
    models.dino = DinoPatches(dino.eval())
    pipeline = TridentPipeline(config, models=models)
    features = pipeline.encode_image(synthetic_image(160, 120, seed=3))
    assert tuple(features.dense.shape[1:]) == (336 // 8, 448 // 8)  # 120x160 -> 336x448
    seg = pipeline.label(features, pipeline.encode_vocabulary('door, chair'))
    assert set(np.unique(seg.labels)) <= {0, 1, 2}
