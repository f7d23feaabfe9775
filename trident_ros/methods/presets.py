"""Each method as its authors run it: per-method defaults that apply unless the user set the field.

:func:`with_presets` fills in, for a mapping of config fields a user gave (a YAML file, the CLI),
the preset of its ``method`` for every field the mapping lacks; a value the user gave always wins.
``TridentConfig.from_dict`` (hence ``from_yaml`` and ``trident-segment --config/--method``) applies
it; constructing ``TridentConfig(...)`` directly gives the plain dataclass defaults.

The presets are the general (not dataset-specific) settings of each reference's code and configs
for CLIP ViT-B/16; thresholds that the references use only on datasets with a background class
(``prob_thd``, SCLIP's ``area_thd`` on VOC21) are off, as in their other configs:

==============  ========================================================  ==================================
method          preset                                                    reference
==============  ========================================================  ==================================
trident         (the dataclass defaults: short side 448, 336/224 windows) YuHengsss/Trident ``configs``
proxy           DINO ViT-B/8, windows 336/112, short side 336             mc-lan/ProxyCLIP ``configs``
maskclip        one whole-image pass, short side 512, plain argmax        chongzhou96/MaskCLIP ``configs``
sclip           short side 336, windows 224/112, logit scale 40           wangf3014/SCLIP ``configs``
clearclip       short side 448, windows 448/224, logit scale 50           mc-lan/ClearCLIP ``configs``
naclip          short side 336, windows 224/112, PAMR on                  sinahmr/NACLIP ``naclip.py``
cliptrase       one whole-image pass, short side 336, logit scale 100     leaves162/CLIPtrase ``clip_self_...py``
scclip          short side 336, windows 224/112, logit scale 40           SuleBai/SC-CLIP ``configs/base_config.py``
resclip(_rcs)   short side 336, windows 224/112, logit scale 40, ADE20K   yvhangyang/ResCLIP ``test_all.sh``
                SFR weights (t_s 2.1, l_s 0.7, l_r 0.3, temp_thd 0.25)
==============  ========================================================  ==================================
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_CLIP_WINDOWS_336 = {'input_short_side': 336, 'clip_slide_crop': 224, 'clip_slide_stride': 112, 'whole_image': False,
                     'logit_scale': 40.0, 'prob_thd': 0.0}
_RESCLIP = {**_CLIP_WINDOWS_336, 'resclip_rcs_lambda': 0.3, 'resclip_sfr_tau': 2.1, 'resclip_sfr_lambda': 0.7,
            'resclip_temp_thd': 0.25}

METHOD_PRESETS: dict[str, dict[str, Any]] = {
    'trident': {},
    'trident_fast': {},
    'proxy': {'dino_model': 'vit_base_patch8_224.dino', 'slide_crop': 336, 'slide_stride': 112,
              'input_short_side': 336, 'prob_thd': 0.0},
    'maskclip': {'input_short_side': 512, 'whole_image': True, 'prob_thd': 0.0},
    'sclip': dict(_CLIP_WINDOWS_336),
    'clearclip': {'input_short_side': 448, 'clip_slide_crop': 448, 'clip_slide_stride': 224, 'whole_image': False,
                  'logit_scale': 50.0, 'prob_thd': 0.0},
    'naclip': {**_CLIP_WINDOWS_336, 'pamr': True},
    'cliptrase': {'input_short_side': 336, 'whole_image': True, 'logit_scale': 100.0, 'prob_thd': 0.0},
    'scclip': dict(_CLIP_WINDOWS_336),
    'resclip': dict(_RESCLIP),
    'resclip_rcs': dict(_RESCLIP),
}
"""The fields each method sets unless the user set them."""


def with_presets(values: Mapping[str, Any], default_method: str = 'trident') -> dict[str, Any]:
    """``values`` with the preset of its method filled in for the fields it lacks.

    Args:
        values: config fields the user gave; ``method`` among them or ``default_method``.
        default_method: the method when ``values`` names none.

    Returns:
        A new dict: the preset, overridden by ``values``.
    """
    return {**METHOD_PRESETS.get(values.get('method', default_method), {}), **values}
