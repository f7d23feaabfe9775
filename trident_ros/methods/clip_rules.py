"""The CLIP-only methods with one last-block attention rule (``maskclip``, ``sclip``, ``clearclip``, ``naclip``), and
the image side every CLIP-only method shares (:class:`ClipWindowMethod`).

No DINO, no SAM: ``windows.clip_slide_crop``/``clip_slide_stride`` windows (or one whole-image pass with
``windows.whole_image``), each window's features L2-normalised, then spliced (averaged where windows overlap, so
logits are the average of the per-window logits). The rules live in :mod:`trident_ros.stages.clip_attention`.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch

from trident_ros.methods.base import Frame, Method, MethodFeatures
from trident_ros.stages.clip_attention import clip_only_features
from trident_ros.stages.splice import splice_unit_features
from trident_ros.stages.windows import cut_windows, normalise

Box = tuple[int, int, int, int]
"""``(y0, x0, y1, x1)`` in pixels."""

WINDOWS_336: Mapping[str, Any] = MappingProxyType({
    'windows.input_short_side': 336, 'windows.clip_slide_crop': 224, 'windows.clip_slide_stride': 112,
    'windows.whole_image': False, 'labelling.logit_scale': 40.0, 'labelling.prob_thd': 0.0})
"""The general setting of SCLIP, NACLIP, SC-CLIP and ResCLIP for CLIP ViT-B/16 (no background class)."""


class ClipWindowMethod(Method):
    """A CLIP-only method: windows cut, CLIP-normalised, :meth:`window_features`, spliced on the token grid."""

    def whole_image(self, config: Any) -> bool:
        """Whether one window covers the whole resized image (``windows.whole_image``)."""
        return config.windows.whole_image

    features_type: type[MethodFeatures] = MethodFeatures
    """The method's features dataclass: ``dense`` and the extras :meth:`window_features` returns."""

    def window_features(self, frame: Frame, crops: torch.Tensor, normalised: torch.Tensor, boxes: list[Box],
                        token_grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], dict[str, Any]]:
        """The crops' patch features (stage ``clip``).

        Args:
            frame: the frame.
            crops: ``(B, 3, h, w)`` in [0, 1].
            normalised: the same, CLIP-normalised in the models' dtype.
            boxes: the windows' boxes in pixels of the resized image.
            token_grid: ``(Hg, Wg)`` of the resized image.

        Returns:
            ``(B, gh*gw, E)`` unit patch features, their grid ``(gh, gw)``, and the other fields of
            :attr:`features_type`.
        """
        raise NotImplementedError

    def encode_image(self, frame: Frame) -> MethodFeatures:
        windows, clip = frame.config.windows, frame.models.clip
        with frame.stage('windows'):
            crop = None if self.whole_image(frame.config) else windows.clip_slide_crop
            resized, boxes, crops = cut_windows(frame.image, windows.input_short_side, windows.max_long_side, crop,
                                                windows.clip_slide_stride, frame.patch, frame.models.device)
        token_grid = (resized.shape[1] // clip.patch_size, resized.shape[2] // clip.patch_size)
        normalised = normalise(crops, clip.mean, clip.std, frame.models.dtype)
        with frame.stage('clip'):
            features, grid, extra = self.window_features(frame, crops, normalised, boxes, token_grid)
        with frame.stage('splice'):
            dense = splice_unit_features(features, grid, boxes, token_grid, clip.patch_size)
        return self.features_type(dense=dense, **extra)


class ClipRuleMethod(ClipWindowMethod):
    """One of the last-block rules of :data:`trident_ros.stages.clip_attention.RULES`, named as its method."""

    def __init__(self, name: str, preset: Mapping[str, Any], summary: str) -> None:
        self.name = name
        self.preset = MappingProxyType(dict(preset))
        self.summary = summary

    def graphs(self, config: Any) -> tuple[tuple[str, int], ...]:
        """``clip_rule_<name>`` at ``windows.clip_slide_crop``; none in whole-image mode (a grid per frame size)."""
        return () if self.whole_image(config) else ((f'clip_rule_{self.name}', config.windows.clip_slide_crop),)

    def window_features(self, frame: Frame, crops: torch.Tensor, normalised: torch.Tensor, boxes: list[Box],
                        token_grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], dict[str, Any]]:
        kind, crop = f'clip_rule_{self.name}', crops.shape[-1]
        if (frame.graphs is not None and not self.whole_image(frame.config) and crops.shape[-2] == crop
                and frame.graphs.has(kind, crop)):
            patch = frame.models.clip.patch_size
            return frame.graphs.run(kind, crops)[0], (crop // patch, crop // patch), {}
        return (*clip_only_features(frame.models.clip, normalised, self.name), {})


CLIP_RULE_METHODS = (
    ClipRuleMethod('maskclip',
                   {'windows.input_short_side': 512, 'windows.whole_image': True, 'labelling.prob_thd': 0.0},
                   'CLIP only, MaskCLIP: values through the last block (chongzhou96/MaskCLIP configs)'),
    ClipRuleMethod('sclip', WINDOWS_336, 'CLIP only, SCLIP: correlative self-attention (wangf3014/SCLIP configs)'),
    ClipRuleMethod('clearclip', {'windows.input_short_side': 448, 'windows.clip_slide_crop': 448,
                                 'windows.clip_slide_stride': 224, 'windows.whole_image': False,
                                 'labelling.logit_scale': 50.0, 'labelling.prob_thd': 0.0},
                   'CLIP only, ClearCLIP: q-q attention, no residual, no feed-forward (mc-lan/ClearCLIP configs)'),
    ClipRuleMethod('naclip', {**WINDOWS_336, 'labelling.pamr': True},
                   'CLIP only, NACLIP: neighbourhood attention, PAMR (sinahmr/NACLIP naclip.py)'),
)
"""Fastest first after maskclip, each with its authors' preset for CLIP ViT-B/16."""
