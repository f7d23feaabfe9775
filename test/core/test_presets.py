"""Per-method presets of the authors' defaults: they apply, once, to the names the user did not give."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from trident_ros import methods
from trident_ros.config import ConfigError, TridentConfig
from trident_ros.pipeline import drop_small_classes


def test_every_method_has_a_valid_preset_of_known_fields():
    specs = TridentConfig.field_specs()
    assert methods.names()[:4] == ('corrclip', 'trident', 'trident_fast', 'proxy') and len(methods.names()) >= 12
    for name in methods.names():
        preset = methods.get(name).preset
        assert set(preset) <= set(specs), name
        config = TridentConfig.from_mapping({'method': name})
        assert config.given == {'method'}
        for field, value in preset.items():
            assert config.flat()[field] == value, (name, field)


def test_presets_apply_unless_the_user_gave_the_name():
    naclip = TridentConfig.from_mapping({'method': 'naclip'})
    assert naclip.labelling.pamr and naclip.windows.input_short_side == 336 and naclip.labelling.prob_thd == 0.0
    mine = TridentConfig.from_mapping({'method': 'naclip', 'labelling': {'pamr': False},
                                       'windows.input_short_side': 400})
    assert not mine.labelling.pamr and mine.windows.input_short_side == 400 and mine.windows.clip_slide_stride == 112
    proxy = TridentConfig.from_mapping({'method': 'proxy'})
    assert (proxy.models.dino_model, proxy.windows.slide_crop, proxy.windows.slide_stride,
            proxy.windows.input_short_side) == ('vit_base_patch8_224.dino', 336, 112, 336)
    assert TridentConfig.from_mapping({}) == TridentConfig()  # trident: the dataclass defaults
    assert TridentConfig(method='naclip').labelling.pamr is False  # the constructor applies no preset
    clearclip = TridentConfig.from_mapping({'method': 'clearclip', 'labelling.logit_scale': 70.0})
    assert clearclip.labelling.logit_scale == 70.0 and clearclip.windows.clip_slide_crop == 448


def test_a_value_equal_to_the_default_that_was_given_is_kept():
    """Given is tracked as given, not as "differs from the default": naclip's preset says 336 and PAMR on."""
    config = TridentConfig.from_mapping({'method': 'naclip', 'windows': {'input_short_side': 448},
                                         'labelling.pamr': False, 'labelling.prob_thd': 0.2})
    assert (config.windows.input_short_side, config.labelling.pamr, config.labelling.prob_thd) == (448, False, 0.2)
    assert config.given == {'method', 'windows.input_short_side', 'labelling.pamr', 'labelling.prob_thd'}
    assert config.windows.clip_slide_crop == 224 and config.labelling.logit_scale == 40.0  # the rest: the preset


def test_a_method_change_reapplies_presets_to_the_names_not_given():
    config = TridentConfig.from_mapping({'method': 'naclip', 'windows.input_short_side': 448})
    trident = config.replace({'method': 'trident'})
    assert trident.windows.input_short_side == 448  # given: kept
    assert not trident.labelling.pamr and trident.labelling.prob_thd == 0.2  # naclip's values undone
    maskclip = trident.replace({'method': 'maskclip', 'labelling.prob_thd': 0.5})
    assert maskclip.windows.whole_image and maskclip.windows.input_short_side == 448
    assert maskclip.labelling.prob_thd == 0.5 and maskclip.given == {'method', 'windows.input_short_side',
                                                                      'labelling.prob_thd'}


def test_nested_dotted_and_old_flat_names(caplog):
    nested = TridentConfig.from_mapping({'labelling': {'prob_thd': 0.3}, 'resclip': {'sfr_tau': 3}})
    dotted = TridentConfig.from_mapping({'labelling.prob_thd': 0.3, 'resclip.sfr_tau': 3.0})
    assert nested == dotted and nested.section('resclip').sfr_tau == 3.0
    assert isinstance(nested.flat()['resclip.sfr_tau'], float)
    with caplog.at_level('WARNING'):
        old = TridentConfig.from_mapping({'prob_thd': 0.3, 'resclip_sfr_tau': 3.0})
    assert old == nested and 'labelling.prob_thd' in caplog.text and 'resclip.sfr_tau' in caplog.text
    with pytest.raises(ConfigError, match='unknown config names: labelling.bogus, nonsense'):
        TridentConfig.from_mapping({'nonsense': 1, 'labelling': {'bogus': 2}})
    with pytest.raises(ConfigError, match=r'labelling.prob_thd=.*must be a number'):
        TridentConfig.from_mapping({'labelling.prob_thd': 'high'})
    with pytest.raises(ConfigError, match=r'resclip.sfr_tau=0.0: must be > 0'):
        TridentConfig.from_mapping({'resclip.sfr_tau': 0})


def test_field_specs_flat_and_sections_agree():
    specs = TridentConfig.field_specs()
    config = TridentConfig()
    assert list(specs) == list(config.flat())
    assert {name: spec.default for name, spec in specs.items()} == config.flat()
    assert specs['refinement.sam_iou_thresh'].section == 'refinement' and specs['trident.beta'].type is float
    assert all(spec.help for spec in specs.values())
    assert config.method_params is config.section('trident') and config.section('trident').aggregation_chunk == 64
    assert TridentConfig(method='maskclip').method_params is None


def test_yaml_files_get_the_preset_of_their_method(tmp_path):
    path = tmp_path / 'params.yaml'
    path.write_text(yaml.safe_dump({'trident': {'ros__parameters': {
        'method': 'cliptrase', 'labelling': {'logit_scale': 60.0}, 'vocabulary': 'door', 'depth': {'use': True}}}}))
    config = TridentConfig.from_yaml(path)  # the node's own names (vocabulary, depth.*) are skipped
    assert config.windows.whole_image and config.windows.input_short_side == 336
    assert config.labelling.logit_scale == 60.0 and config.given == {'method', 'labelling.logit_scale'}


def test_area_threshold_drops_classes_on_a_small_share_of_the_pixels():
    probs = torch.zeros(3, 10, 10)
    probs[0] = 0.5
    probs[1, :, :1] = 0.9  # class 1 wins 10 of 100 pixels
    probs[2, 0, 1] = 0.9  # class 2 wins 1 pixel
    kept = drop_small_classes(probs.clone(), 0.05)
    assert float(kept[2].abs().sum()) == 0 and torch.equal(kept[:2], probs[:2])
    assert float(drop_small_classes(probs.clone(), 0.1)[1].abs().sum()) == 0  # at most 10%: dropped
    with pytest.raises(ConfigError, match='labelling.area_thd'):
        TridentConfig.from_mapping({'labelling.area_thd': 1.5})


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
    assert (headline.method, headline.models.clip_model, headline.models.clip_pretrained) == (
        'trident', 'ViT-H-14', 'laion2b_s32b_b79k')
    assert (headline.models.dino_model, headline.models.sam_model, headline.windows.slide_crop,
            headline.windows.slide_stride) == ('vit_base_patch16_224.dino', 'vit_b', 336, 224)
    config = headline.replace({'models.model_scale': 'tiny', 'models.random_weights': True, 'models.device': 'cpu',
                               'labelling.prob_thd': 0.0})
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
    assert pipeline.crop_multiple == 112  # CLIP /14 and DINO /16: crops are multiples of both
    seg = pipeline.label(features, pipeline.encode_vocabulary('door, chair'))
    assert set(np.unique(seg.labels)) <= {1, 2} and seg.labels.shape == (120, 160)  # prob_thd 0: every pixel


def test_cli_method_brings_its_preset_and_the_file_wins(tmp_path):
    from trident_ros.tools.segment import build_config, parse_args

    config = build_config(parse_args(['x.png', '-v', 'door', '--method', 'naclip']))
    assert config.labelling.pamr and config.windows.input_short_side == 336
    path = tmp_path / 'mine.yaml'
    path.write_text(yaml.safe_dump({'labelling': {'pamr': False}, 'method': 'sclip'}))
    config = build_config(parse_args(['x.png', '-v', 'door', '--config', str(path), '--method', 'naclip']))
    assert config.method == 'naclip' and not config.labelling.pamr and config.windows.input_short_side == 336


def test_proxy_preset_runs_with_a_patch_8_dino():
    """ProxyCLIP's setting: DINO ViT-B/8 (tiny here), 336/112 windows, short side 336.

    The dense map is on the DINO grid (8 px).
    """
    import numpy as np
    import timm

    from trident_ros.models import DinoPatches, load_models
    from trident_ros.pipeline import TridentPipeline
    from trident_ros.tools.bench import synthetic_image

    config = TridentConfig.from_mapping({'method': 'proxy', 'labelling.prob_thd': 0.0,
                                         'models': {'model_scale': 'tiny', 'random_weights': True, 'device': 'cpu'}})
    models = load_models(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dino = timm.create_model(config.models.dino_model, pretrained=False, embed_dim=48, depth=2, num_heads=2,
                                 patch_size=8, img_size=224)
    models.dino = DinoPatches(dino.eval())
    pipeline = TridentPipeline(config, models=models)
    features = pipeline.encode_image(synthetic_image(160, 120, seed=3))
    assert tuple(features.dense.shape[1:]) == (336 // 8, 448 // 8)  # 120x160 -> 336x448
    assert pipeline.crop_multiple == 16  # CLIP /16 and DINO /8
    seg = pipeline.label(features, pipeline.encode_vocabulary('door, chair'))
    assert set(np.unique(seg.labels)) <= {1, 2}  # prob_thd 0: every pixel
