"""One configuration for the whole pipeline, in sections, with the reference defaults and validation.

``TridentConfig`` holds ``method`` (a registered method, :mod:`trident_ros.methods`), the shared sections
``models``, ``windows``, ``labelling`` and ``refinement``, and one section per method family, owned by that family's
module (``trident``, ``proxy``, ``cliptrase``, ``resclip``, ...: ``config.section(name)``). Every field has a
dotted name ``<section>.<field>`` (``method`` is ``method``), as ROS 2 names nested parameters.

:meth:`TridentConfig.from_mapping` is the one place a method's authors' preset applies: once, to every dotted name
the user did not give; what was given is kept even when it equals a default (``config.given``). YAML files, the
command line and the node all build their configuration through it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trident_ros import methods
from trident_ros.errors import ConfigError
from trident_ros.methods.base import ParamError, setting
from trident_ros.runtime.onnx_runtime import PROVIDERS, parse_providers

logger = logging.getLogger(__name__)

SAM_MODELS = ('vit_b', 'vit_l', 'vit_h')
DEVICES = ('auto', 'cpu', 'cuda')
MODEL_SCALES = ('full', 'tiny')
BACKENDS = ('torch', 'onnxruntime')
DEFAULT_METHOD = 'trident'
__all__ = ['ConfigError', 'FieldSpec', 'MODEL_FIELDS', 'TridentConfig']


@dataclass(frozen=True)
class ModelsConfig:
    """Section ``models``: which weights, where they run. Names are upstream architectures (open_clip, timm,
    segment-anything's registry).
    """

    clip_model: str = setting('ViT-B-16', 'open_clip architecture of the CLIP branch (QuickGELU is forced where '
                                          'its weights need it)')
    clip_pretrained: str = setting('openai', "open_clip pretrained tag (e.g. metaclip_fullcc: MetaCLIP 2.5B, the "
                                             "CorrCLIP authors' CLIP), or a local .pt/.bin/.safetensors file of CLIP "
                                             'weights')
    dino_model: str = setting('vit_base_patch16_224.dino', 'timm name of the DINO ViT whose patch features guide '
                                                           'CLIP attention')
    dino_checkpoint: str = setting('', 'local file of DINO weights; empty: the standard file in weights_dir, else '
                                       'the hub cache')
    sam_model: str = setting('vit_b', 'SAM image encoder: vit_b, vit_l or vit_h')
    sam_checkpoint: str = setting('', 'SAM checkpoint file; empty: the official file name in weights_dir')
    weights_dir: str = setting('', 'the folder where SAM, CLIP and DINO weights are found by their standard names '
                                   'and downloaded to (trident-weights fetch); empty: $TRIDENT_WEIGHTS_DIR, else '
                                   '~/.cache/trident_ros')
    download: bool = setting(True, 'download missing weights from their official URLs')
    random_weights: bool = setting(False, 'SMOKE TEST ONLY: random weights, labels are meaningless')
    model_scale: str = setting('full', "'full': the paper's architectures; 'tiny': small configurations of the "
                                       'same architectures (tests and smoke runs, random weights only)')
    device: str = setting('auto', 'auto (CUDA if available), cuda, cuda:N or cpu')
    fp16: bool = setting(True, 'half precision for the encoders on CUDA (CPU: see bf16)')
    bf16: bool = setting(False, 'bfloat16 encoders on the CPU: about 2x faster and half the parameter memory where '
                                'the CPU has AVX512-BF16 or AMX, results close to fp32 but not equal '
                                '(docs/performance.md); default fp32')
    backend: str = setting('torch', "'torch' (eager), or 'onnxruntime': the method's exported encoder graphs "
                                    '(trident-export) through ONNX Runtime; a stage without a graph stays torch')
    engine_cache_dir: str = setting('', 'exported graphs and TensorRT engines; empty: the folder engines in '
                                        'weights_dir')
    ort_providers: str = setting('tensorrt,cuda,cpu', 'ONNX Runtime execution providers in order of preference '
                                                      '(tensorrt, cuda, cpu); those missing are dropped')


@dataclass(frozen=True)
class WindowsConfig:
    """Section ``windows``: the image side's rescale and sliding windows."""

    input_short_side: int = setting(448, 'the CLIP/DINO branch sees the image rescaled to this short side (0: '
                                         'original size)')
    max_long_side: int = setting(2048, 'cap on the long side of that rescale')
    slide_crop: int = setting(336, 'sliding-window crop in pixels (trident, trident_fast, proxy); a multiple of '
                                   "the CLIP and DINO patch sizes (checked against the loaded models)")
    slide_stride: int = setting(224, 'sliding-window stride in pixels (<= slide_crop; trident, trident_fast, proxy)')
    clip_slide_crop: int = setting(224, "window crop of the CLIP-only methods (their references' 224, ClearCLIP's "
                                        "code 448); a multiple of CLIP's patch size (checked against the model)")
    clip_slide_stride: int = setting(112, 'window stride of the CLIP-only methods (<= clip_slide_crop)')
    whole_image: bool = setting(False, 'CLIP-only methods: one pass over the whole resized image instead of '
                                       'clip_slide_crop windows (as MaskCLIP; cliptrase always clusters one '
                                       'whole-image pass)')
    reuse_threshold: float = setting(0.0, 'reuse the image side of the last encoded frame while a new frame of the '
                                          'same size differs from it by at most this mean absolute difference '
                                          '(grey levels, 0-255; e.g. 1.5 for a static camera); 0: off')


@dataclass(frozen=True)
class LabellingConfig:
    """Section ``labelling``: from features to labels, and the vocabulary's limits."""

    logit_scale: float = setting(40.0, 'softmax temperature on cosine logits')
    prob_thd: float = setting(0.2, 'pixels whose best class probability is lower stay unlabeled (0)')
    pamr: bool = setting(False, "refine the logits with PAMR (10 iterations, dilations 8/16) at labelling, as "
                                "NACLIP's default; costs time per frame and per relabel")
    area_thd: float = setting(0.0, "SCLIP's area threshold: a class taking at most this fraction of the image's "
                                   'argmax pixels is dropped before labelling (0: off)')
    text_cache_size: int = setting(1024, 'text features kept per name (LRU)')
    max_classes: int = setting(1000, 'largest vocabulary accepted')


@dataclass(frozen=True)
class RefinementConfig:
    """Section ``refinement``: SAM refinement (methods that refine: trident)."""

    refine: bool = setting(True, 'refine the coarse segmentation by prompting SAM (method trident only)')
    coarse_thresh: float = setting(0.2, 'refinement drops classes whose best probability is lower')
    minimal_area: int = setting(225, 'smallest region (pixels, half resolution) that prompts SAM')
    sam_mask_coff: float = setting(0.005, 'mask-prompt value factor')
    sam_iou_thresh: float = setting(0.8, 'keep a SAM mask whose predicted IoU exceeds this')


SECTIONS: dict[str, type] = {'models': ModelsConfig, 'windows': WindowsConfig, 'labelling': LabellingConfig,
                             'refinement': RefinementConfig}
"""The shared sections; each method family adds its own (:func:`trident_ros.methods.sections`)."""
MODEL_FIELDS = frozenset({'method', *(f'models.{f.name}' for f in dataclasses.fields(ModelsConfig)),
                          'labelling.text_cache_size'})
"""Dotted names whose change needs new models (a new pipeline); every other name applies to a running one."""
METHOD_HELP = ('segmentation method, a registered name (docs/methods.md), slowest/most accurate first: corrclip '
               '(CLIP+DINO+SAM masks, CorrCLIP), trident '
               '(CLIP+DINO+SAM, SAM aggregation and refinement), trident_fast (no SAM refinement), proxy (CLIP+DINO, '
               'no SAM), then CLIP only: maskclip, sclip, clearclip, naclip (one last-block rule), cliptrase, scclip, '
               'resclip, resclip_rcs (reading intermediate blocks). Only the models a method needs are loaded. A '
               "method brings its authors' values for the fields not given (its module in trident_ros/methods)")

RENAMED: dict[str, tuple[str, ...]] = {
    **{f.name: (f'{section}.{f.name}',) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)},
    'beta': ('trident.beta', 'proxy.beta'), 'gamma': ('trident.gamma', 'proxy.gamma'),
    'cos_fac': ('trident.cos_fac',), 'refine_neg_cos': ('trident.refine_neg_cos',),
    'aggregation_chunk': ('trident.aggregation_chunk',),
    'cliptrase_eps': ('cliptrase.eps',), 'cliptrase_min_samples': ('cliptrase.min_samples',),
    'resclip_rcs_lambda': ('resclip.rcs_lambda',), 'resclip_sfr_tau': ('resclip.sfr_tau',),
    'resclip_sfr_lambda': ('resclip.sfr_lambda',), 'resclip_temp_thd': ('resclip.temp_thd',),
    **dict.fromkeys(('use_depth', 'depth_scale', 'min_depth', 'max_depth', 'sync_slop', 'exact_sync'), ()),
}
"""Old flat names -> their dotted names, accepted with a warning; the depth fields (now the node's parameters
``depth.*``) map to none and are ignored here."""


@dataclass(frozen=True)
class FieldSpec:
    """One configuration field: dotted ``name``, ``section`` ('' for ``method``), ``default``, ``type``, ``help``."""

    name: str
    section: str
    default: Any
    type: type
    help: str


def _default_method_sections() -> dict[str, Any]:
    return {name: params() for name, params in methods.sections().items()}


@dataclass(frozen=True)
class TridentConfig:
    """Everything the pipeline can be told. Defaults are the reference's (Trident, base).

    Build it with :meth:`from_mapping` (or :meth:`from_yaml`), which applies the method's preset to the names not
    given; the constructor takes the sections as they are (no preset). ``given`` (not compared) is the set of
    dotted names a user gave.
    """

    method: str = field(default=DEFAULT_METHOD, metadata={'help': METHOD_HELP})
    models: ModelsConfig = field(default_factory=ModelsConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    labelling: LabellingConfig = field(default_factory=LabellingConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)
    method_sections: Mapping[str, Any] = field(default_factory=_default_method_sections)
    given: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # --- reading -----------------------------------------------------------------------------------
    def section(self, name: str) -> Any:
        """The section ``name``: a shared one or a method family's (its registered default if not held)."""
        if name in SECTIONS:
            return getattr(self, name)
        if name in self.method_sections:
            return self.method_sections[name]
        params = methods.sections().get(name)
        if params is None:
            raise ConfigError(f'no section {name!r}: one of {", ".join([*SECTIONS, *methods.sections()])}')
        return params()

    @property
    def method_params(self) -> Any:
        """The running method's section, or None when it has none."""
        name = methods.get(self.method).section
        return None if name is None else self.section(name)

    @property
    def method_models(self) -> tuple[str, ...]:
        """The models the running method needs, of ``clip``, ``dino``, ``sam`` (only these are loaded)."""
        return methods.get(self.method).models

    def _sections(self) -> Iterator[tuple[str, Any]]:
        for name in [*SECTIONS, *methods.sections()]:
            yield name, self.section(name)

    def flat(self) -> dict[str, Any]:
        """Every dotted name -> its effective value (what runs), ``method`` included."""
        values: dict[str, Any] = {'method': self.method}
        for name, section in self._sections():
            values.update({f'{name}.{f.name}': getattr(section, f.name) for f in dataclasses.fields(section)})
        return values

    @classmethod
    def field_specs(cls) -> dict[str, FieldSpec]:
        """Every dotted name -> its :class:`FieldSpec` (plain default, not a preset's), ``method`` first."""
        specs = {'method': FieldSpec('method', '', DEFAULT_METHOD, str, METHOD_HELP)}
        for name, section in [*SECTIONS.items(), *methods.sections().items()]:
            for f in dataclasses.fields(section):
                default = f.default
                specs[f'{name}.{f.name}'] = FieldSpec(f'{name}.{f.name}', name, default, type(default),
                                                      f.metadata.get('help', ''))
        return specs

    @staticmethod
    def describe(name: str) -> str:
        """The help text of the dotted field ``name``."""
        return TridentConfig.field_specs()[name].help

    # --- checking ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid dotted field.

        Only values are checked, never files (weight files are looked up when the models are loaded) and not the
        crops against patch sizes (they depend on the models: checked when the pipeline is built).
        """
        def fail(name: str, why: str) -> None:
            section, _, key = name.partition('.')
            raise ConfigError(f'{name}={getattr(self.section(section), key)!r}: {why}')

        _registered(self.method)
        models, windows, labelling, refinement = self.models, self.windows, self.labelling, self.refinement
        if models.sam_model not in SAM_MODELS:
            fail('models.sam_model', f'must be one of {", ".join(SAM_MODELS)}')
        if models.model_scale not in MODEL_SCALES:
            fail('models.model_scale', f'must be one of {", ".join(MODEL_SCALES)}')
        if models.model_scale == 'tiny' and not models.random_weights:
            fail('models.model_scale', "'tiny' architectures have no trained weights: set models.random_weights too")
        if models.backend not in BACKENDS:
            fail('models.backend', f'must be one of {", ".join(BACKENDS)}')
        try:
            parse_providers(models.ort_providers)
        except ValueError:
            fail('models.ort_providers', f'must be a comma-separated list of {", ".join(PROVIDERS)}')
        if not (models.device in DEVICES or (models.device.startswith('cuda:') and models.device[5:].isdigit())):
            fail('models.device', 'must be auto, cpu, cuda or cuda:N')
        for name in ('windows.slide_crop', 'windows.slide_stride', 'windows.clip_slide_crop',
                     'windows.clip_slide_stride', 'windows.max_long_side', 'labelling.text_cache_size',
                     'labelling.max_classes'):
            if self._value(name) <= 0:
                fail(name, 'must be positive')
        for crop, stride in (('slide_crop', 'slide_stride'), ('clip_slide_crop', 'clip_slide_stride')):
            if getattr(windows, stride) > getattr(windows, crop):
                fail(f'windows.{stride}', f'must not exceed windows.{crop}={getattr(windows, crop)} (windows would '
                                          'leave gaps)')
        if not 0.0 <= windows.reuse_threshold <= 255.0:
            fail('windows.reuse_threshold', 'must be in [0, 255] (0: off)')
        if windows.input_short_side < 0:
            fail('windows.input_short_side', 'must be >= 0 (0: original size)')
        for name in ('labelling.prob_thd', 'labelling.area_thd', 'refinement.coarse_thresh'):
            if not 0.0 <= self._value(name) <= 1.0:
                fail(name, 'must be in [0, 1]')
        if not labelling.logit_scale > 0:
            fail('labelling.logit_scale', 'must be > 0')
        if not math.isfinite(refinement.sam_iou_thresh):
            fail('refinement.sam_iou_thresh', "must be a finite number: SAM masks whose predicted IoU exceeds it are "
                                              "kept (SAM's prediction is not bounded to [0, 1]; below every "
                                              'prediction keeps every mask, above every prediction keeps none)')
        if refinement.sam_mask_coff < 0:
            fail('refinement.sam_mask_coff', 'must be >= 0')
        if refinement.minimal_area < 1:
            fail('refinement.minimal_area', 'must be >= 1')
        for name, params in self.method_sections.items():
            try:
                params.validate()
            except ParamError as error:
                fail(f'{name}.{error.name}', error.why)

    def _value(self, name: str) -> Any:
        section, _, key = name.partition('.')
        return getattr(self.section(section), key)

    # --- building ----------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TridentConfig:
        """Build from nested (``{'labelling': {'prob_thd': 0.3}}``) or dotted (``{'labelling.prob_thd': 0.3}``)
        values, or both; the method's authors' preset fills in every dotted name not given.

        Values are type-checked (an int for a float is fine); old flat names are accepted with a warning.

        Raises:
            ConfigError: an unknown name, a value of the wrong type, an unknown method or an invalid value.
        """
        given = _typed(_flatten(values))
        method = given.get('method', DEFAULT_METHOD)
        preset = dict(_registered(method).preset)
        stray = sorted(set(preset) - set(cls.field_specs()))
        if stray:
            raise ConfigError(f'the preset of method {method!r} names unknown fields: {", ".join(stray)}')
        return cls._build({**preset, **given}, frozenset(given))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> TridentConfig:
        """Load a YAML mapping (nested sections and/or dotted names); ``overrides`` (e.g. command-line options,
        dotted) win over the file. A ROS 2 parameters file (``<node>: ros__parameters: ...``) also works: its
        names this configuration does not know (the node's own) are skipped.
        """
        import yaml

        with open(path, encoding='utf-8') as stream:
            data = yaml.safe_load(stream) or {}
        if not isinstance(data, dict):
            raise ConfigError(f'{path}: expected a mapping of config names')
        for value in data.values():
            if isinstance(value, dict) and 'ros__parameters' in value:
                known = {*cls.field_specs(), *SECTIONS, *methods.sections(), *RENAMED}
                data = {key: item for key, item in (value['ros__parameters'] or {}).items() if key in known}
                break
        return cls.from_mapping({**_flatten(data), **_flatten(overrides or {})})

    def replace(self, changes: Mapping[str, Any]) -> TridentConfig:
        """A validated copy with dotted ``changes``; they become given. A ``method`` change re-applies presets
        to the names not given: the new method's values, and plain defaults where only the old method had one.
        """
        typed = _typed(_flatten(changes))
        given = self.given | set(typed)
        values = self.flat()
        old = methods.get(self.method)
        new = _registered(typed.get('method', self.method))
        if new is not old:
            specs = self.field_specs()
            for name in set(old.preset) | set(new.preset):
                if name not in given:
                    values[name] = new.preset[name] if name in new.preset else specs[name].default
        return self._build({**values, **typed}, frozenset(given))

    @classmethod
    def _build(cls, values: Mapping[str, Any], given: frozenset[str]) -> TridentConfig:
        """A config from dotted values (a missing name takes its plain default)."""
        def make(name: str, section: type) -> Any:
            prefix = f'{name}.'
            return section(**{key[len(prefix):]: value for key, value in values.items() if key.startswith(prefix)})

        return cls(method=values.get('method', DEFAULT_METHOD), **{name: make(name, s) for name, s in SECTIONS.items()},
                   method_sections={name: make(name, s) for name, s in methods.sections().items()}, given=given)


def _registered(name: str) -> methods.Method:
    """The registered method ``name``; else :class:`ConfigError` listing the registered ones."""
    try:
        return methods.get(name)
    except KeyError:
        raise ConfigError(f'method={name!r}: must be one of {", ".join(methods.names())}') from None


def _flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """Nested and dotted values -> dotted names (old flat names renamed, with a warning).

    Raises:
        ConfigError: names no field has.
    """
    specs = TridentConfig.field_specs()
    sections = {*SECTIONS, *methods.sections()}
    flat: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in values.items():
        key = str(key)
        if isinstance(value, Mapping) and key in sections:
            for inner, item in value.items():
                name = f'{key}.{inner}'
                if name in specs and not isinstance(item, Mapping):
                    flat[name] = item
                else:
                    unknown.append(name)
        elif key in specs:
            flat[key] = value
        elif key in RENAMED:
            new = RENAMED[key]
            logger.warning('config name %r is deprecated: %s', key,
                           f'use {" and ".join(new)}' if new else 'a node parameter now (depth.*), ignored here')
            flat.update(dict.fromkeys(new, value))
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(f'unknown config names: {", ".join(sorted(unknown))}')
    return flat


def _typed(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted values checked against their fields' types (an int for a float becomes a float)."""
    specs = TridentConfig.field_specs()
    typed = {}
    for name, value in values.items():
        kind = specs[name].type
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f'{name}={value!r}: must be true or false')
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f'{name}={value!r}: must be a number')
            if kind is int and not float(value).is_integer():
                raise ConfigError(f'{name}={value!r}: must be an integer')
            value = kind(value)
        if kind is str and not isinstance(value, str):
            raise ConfigError(f'{name}={value!r}: must be a string')
        typed[name] = value
    return typed
