"""ProxyCLIP-style (method ``proxy``): the DINO-guided CLIP windows of Trident, spliced and projected on the window
token grid; no SAM. ProxyCLIP's attention rule takes the DINO similarity mean per window, as it runs one window at
a time (mc-lan/ProxyCLIP).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from trident_ros.methods.base import Frame, Method, MethodFeatures, setting
from trident_ros.methods.trident import check_beta_gamma, project, spliced_windows


@dataclass(frozen=True)
class ProxyParams:
    """Section ``proxy``."""

    beta: float = setting(1.2, 'DINO similarity mean offset factor')
    gamma: float = setting(3.0, 'DINO similarity sharpening factor')

    def validate(self) -> None:
        """Raise :class:`~trident_ros.methods.base.ParamError` for the first invalid field."""
        check_beta_gamma(self.beta, self.gamma)


class ProxyMethod(Method):
    name = 'proxy'
    models = ('clip', 'dino')
    window_models = ('clip', 'dino')
    crop_field = 'windows.slide_crop'
    stride_field = 'windows.slide_stride'
    section = 'proxy'
    params = ProxyParams
    preset = MappingProxyType({'models.dino_model': 'vit_base_patch8_224.dino', 'windows.slide_crop': 336,
                               'windows.slide_stride': 112, 'windows.input_short_side': 336,
                               'labelling.prob_thd': 0.0})
    """mc-lan/ProxyCLIP ``configs``: DINO ViT-B/8, windows 336/112, short side 336."""
    summary = 'CLIP + DINO, ProxyCLIP-style, no SAM'

    def graphs(self, config: Any) -> tuple[tuple[str, int], ...]:
        return (('dino_patches', config.windows.slide_crop), ('clip_guided', config.windows.slide_crop))

    def encode_image(self, frame: Frame) -> MethodFeatures:
        params: ProxyParams = frame.config.section(self.section)
        spliced = spliced_windows(frame, params.beta, params.gamma, mean_per_crop=True)
        return MethodFeatures(dense=project(frame, spliced))


PROXY = ProxyMethod()
