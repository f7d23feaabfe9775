"""A method that lives outside the package, registered at import (``TRIDENT_METHOD_MODULES=plugin_method``).

MaskCLIP's last block on one whole-image pass, its features times ``plugin_test.sign``: -1 flips every label of a
two-class vocabulary, so a test sees that the section reaches the method.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from trident_ros.methods import register
from trident_ros.methods.base import Frame, ParamError, setting
from trident_ros.methods.clip_rules import Box, ClipWindowMethod
from trident_ros.stages.clip_attention import clip_only_features


@dataclass(frozen=True)
class PluginParams:
    sign: float = setting(1.0, 'test only: +1 or -1, the sign of the features')

    def validate(self) -> None:
        if self.sign not in (1.0, -1.0):
            raise ParamError('sign', 'must be 1 or -1')


class PluginMethod(ClipWindowMethod):
    name = 'plugin_test'
    section = 'plugin_test'
    params = PluginParams
    preset = MappingProxyType({'windows.whole_image': True})
    summary = 'test only: MaskCLIP on the whole image, features times a sign'

    def window_features(self, frame: Frame, crops: torch.Tensor, normalised: torch.Tensor, boxes: list[Box],
                        token_grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], dict[str, Any]]:
        features, grid = clip_only_features(frame.models.clip, normalised, 'maskclip')
        return features * frame.config.section(self.section).sign, grid, {}


register(PluginMethod())
