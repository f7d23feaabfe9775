"""One configuration dataclass for the whole pipeline, with the reference defaults and validation."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAM_MODELS = ('vit_b', 'vit_l', 'vit_h')
DEVICES = ('auto', 'cpu', 'cuda')
MODEL_SCALES = ('full', 'tiny')
METHODS = ('trident', 'trident_fast', 'proxy', 'maskclip', 'sclip', 'clearclip', 'naclip', 'cliptrase', 'scclip',
           'resclip', 'resclip_rcs')
"""Segmentation methods, slowest and most accurate first (see :mod:`trident_ros.stages.clip_attention`)."""
CLIP_ONLY_METHODS = ('maskclip', 'sclip', 'clearclip', 'naclip')
"""Methods that change only CLIP's last block: no DINO, no SAM; windows ``clip_slide_crop/stride``."""
CLIP_BLOCK_METHODS = ('cliptrase', 'scclip', 'resclip', 'resclip_rcs')
"""CLIP-only methods that also read CLIP's intermediate blocks (:mod:`trident_ros.methods.cliptrase`,
:mod:`trident_ros.methods.scclip`, :mod:`trident_ros.methods.resclip`): no DINO, no SAM; windows
``clip_slide_crop/stride`` or ``whole_image``."""
METHOD_MODELS: dict[str, tuple[str, ...]] = {
    'trident': ('clip', 'dino', 'sam'),
    'trident_fast': ('clip', 'dino', 'sam'),
    'proxy': ('clip', 'dino'),
    **dict.fromkeys(CLIP_ONLY_METHODS, ('clip',)),
    **dict.fromkeys(CLIP_BLOCK_METHODS, ('clip',)),
}
"""The models each method needs; only these are loaded (and their weights looked up)."""
PATCH_SIZE = 16
"""The patch size of every ViT here (CLIP and DINO ViT-B/16, SAM's encoder): crops, token grids and
SAM's input rounding are multiples of it."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the reason."""


@dataclass
class TridentConfig:
    """Everything the Trident pipeline can be told. Defaults are the reference's (Trident, base).

    Model fields name upstream architectures: ``clip_model``/``clip_pretrained`` for open_clip,
    ``dino_model`` for timm, ``sam_model`` for segment-anything's registry.
    """

    # --- method ---------------------------------------------------------------------------------
    method: str = field(default='trident', metadata={
        'help': 'segmentation method, slowest/most accurate first: trident (CLIP+DINO+SAM, SAM aggregation and '
                'refinement), trident_fast (no SAM refinement), proxy (CLIP+DINO, ProxyCLIP-style, no SAM), '
                'then CLIP only (one CLIP last-block rule, no DINO/SAM): maskclip, sclip, clearclip, naclip; '
                'CLIP only, reading intermediate blocks: cliptrase (clusters, vote), scclip, resclip (second pass '
                'per vocabulary), resclip_rcs (its first pass). Only the models a method needs are loaded; refine '
                'applies to trident only. From a YAML file or the CLI, a method brings its authors\' defaults '
                '(trident_ros/methods/presets.py) for the fields not given'})

    # --- models and weights -------------------------------------------------------------------
    clip_model: str = field(default='ViT-B-16', metadata={
        'help': 'open_clip architecture of the CLIP branch (QuickGELU is forced, as OpenAI weights need)'})
    clip_pretrained: str = field(default='openai', metadata={
        'help': "open_clip pretrained tag, or a local .pt/.bin/.safetensors file of CLIP weights"})
    dino_model: str = field(default='vit_base_patch16_224.dino', metadata={
        'help': 'timm name of the DINO ViT whose patch features guide CLIP attention'})
    dino_checkpoint: str = field(default='', metadata={
        'help': 'local file of DINO weights; empty: the standard file in weights_dir, else the hub cache'})
    sam_model: str = field(default='vit_b', metadata={'help': 'SAM image encoder: vit_b, vit_l or vit_h'})
    sam_checkpoint: str = field(default='', metadata={
        'help': 'SAM checkpoint file; empty: the official file name in weights_dir'})
    weights_dir: str = field(default='', metadata={
        'help': 'the folder where SAM, CLIP and DINO weights are found by their standard names and downloaded to '
                '(trident-weights fetch); empty: $TRIDENT_WEIGHTS_DIR, else ~/.cache/trident_ros'})
    download: bool = field(default=True, metadata={'help': 'download missing weights from their official URLs'})
    random_weights: bool = field(default=False, metadata={
        'help': 'SMOKE TEST ONLY: random weights, labels are meaningless'})
    model_scale: str = field(default='full', metadata={
        'help': "'full': the paper's architectures; 'tiny': small configurations of the same architectures "
                '(tests and smoke runs, random weights only)'})

    # --- where it runs --------------------------------------------------------------------------
    device: str = field(default='auto', metadata={'help': 'auto (CUDA if available), cuda, cuda:N or cpu'})
    fp16: bool = field(default=True, metadata={'help': 'half precision for the encoders on CUDA (CPU: see bf16)'})
    bf16: bool = field(default=False, metadata={
        'help': 'bfloat16 encoders on the CPU: about 2x faster and half the parameter memory where the CPU has '
                'AVX512-BF16 or AMX, results close to fp32 but not equal (docs/performance.md); default fp32'})

    # --- image side -----------------------------------------------------------------------------
    input_short_side: int = field(default=448, metadata={
        'help': 'the CLIP/DINO branch sees the image rescaled to this short side (0: original size)'})
    max_long_side: int = field(default=2048, metadata={'help': 'cap on the long side of that rescale'})
    slide_crop: int = field(default=336, metadata={
        'help': 'sliding-window crop size in pixels (trident, trident_fast, proxy)'})
    slide_stride: int = field(default=224, metadata={
        'help': 'sliding-window stride in pixels (<= slide_crop; trident, trident_fast, proxy)'})
    clip_slide_crop: int = field(default=224, metadata={
        'help': 'sliding-window crop size of the CLIP-only methods (maskclip, sclip, clearclip, naclip; '
                "their references' 224, ClearCLIP's code 448)"})
    clip_slide_stride: int = field(default=112, metadata={
        'help': 'sliding-window stride of the CLIP-only methods (<= clip_slide_crop)'})
    beta: float = field(default=1.2, metadata={'help': 'DINO similarity mean offset factor'})
    gamma: float = field(default=3.0, metadata={'help': 'DINO similarity sharpening factor'})
    cos_fac: float = field(default=1.2, metadata={'help': 'SAM aggregation threshold factor on mean value cosine'})
    refine_neg_cos: bool = field(default=True, metadata={
        'help': 'keep a negative SAM threshold (false: a negative threshold becomes 0.6)'})
    reuse_threshold: float = field(default=0.0, metadata={
        'help': 'reuse the image side of the last encoded frame while a new frame of the same size differs '
                'from it by at most this mean absolute difference (grey levels, 0-255; e.g. 1.5 for a static '
                'camera); 0: off, every frame is encoded'})
    aggregation_chunk: int = field(default=64, metadata={
        'help': 'queries per chunk of the SAM aggregation, rounded down to whole token rows (at least one); '
                'memory bound, the result does not depend on it'})

    # --- labelling and refinement ---------------------------------------------------------------
    logit_scale: float = field(default=40.0, metadata={'help': 'softmax temperature on cosine logits'})
    prob_thd: float = field(default=0.2, metadata={
        'help': 'pixels whose best class probability is lower stay unlabeled (0)'})
    refine: bool = field(default=True, metadata={
        'help': 'refine the coarse segmentation by prompting SAM (method trident only)'})
    coarse_thresh: float = field(default=0.2, metadata={
        'help': 'refinement drops classes whose best probability is lower'})
    minimal_area: int = field(default=225, metadata={
        'help': 'smallest region (pixels, half resolution) that prompts SAM'})
    sam_mask_coff: float = field(default=0.005, metadata={'help': 'mask-prompt value factor'})
    sam_iou_thresh: float = field(default=0.8, metadata={'help': "keep a SAM mask whose predicted IoU exceeds this"})

    # --- vocabulary -------------------------------------------------------------------------------
    text_cache_size: int = field(default=1024, metadata={'help': 'text features kept per name (LRU)'})
    max_classes: int = field(default=1000, metadata={'help': 'largest vocabulary accepted'})

    # --- the other training-free methods (appended) ---------------------------------------------
    whole_image: bool = field(default=False, metadata={
        'help': 'CLIP-only methods: one pass over the whole resized image instead of clip_slide_crop windows '
                '(as MaskCLIP; cliptrase always clusters one whole-image pass)'})
    pamr: bool = field(default=False, metadata={
        'help': "refine the logits with PAMR (10 iterations, dilations 8/16) at labelling, as NACLIP's default; "
                'vocabulary side, costs time per frame and per relabel'})
    area_thd: float = field(default=0.0, metadata={
        'help': "SCLIP's area threshold: a class taking at most this fraction of the image's argmax pixels is "
                'dropped before labelling (0: off)'})
    cliptrase_eps: float = field(default=0.0, metadata={
        'help': 'cliptrase DBSCAN radius; 0: 0.7 * sqrt(patches / 196) (the authors\' 0.7 at 224 px, 1.1 at 336)'})
    cliptrase_min_samples: int = field(default=0, metadata={
        'help': 'cliptrase DBSCAN core count; 0: round(3 * patches / 196) (the authors\' 3 at 224 px, 7 at 336)'})
    resclip_rcs_lambda: float = field(default=0.3, metadata={
        'help': 'resclip/resclip_rcs: weight of the cross-correlation of blocks 6-9 in the last block (l_r)'})
    resclip_sfr_tau: float = field(default=2.1, metadata={'help': 'resclip: SFR temperature (t_s)'})
    resclip_sfr_lambda: float = field(default=0.7, metadata={'help': 'resclip: SFR weight (l_s)'})
    resclip_temp_thd: float = field(default=0.25, metadata={
        'help': 'resclip: first-pass pixels less probable than this are unsure in SFR (ADE20K setting)'})
    # --- depth: labelled 3D (ROS node: ~/points, ClassMask 3D, ~/detections_3d) --------------------
    use_depth: bool = field(default=False, metadata={
        'help': 'subscribe depth (registered to the colour image, 16UC1 or 32FC1) and depth/camera_info; '
                'publish the labelled organized cloud ~/points, 3D per ClassMask and ~/detections_3d'})
    depth_scale: float = field(default=0.001, metadata={'help': 'metres per unit of a 16UC1 depth image (mm: 0.001)'})
    min_depth: float = field(default=0.0, metadata={'help': 'nearer depth (metres) is no point'})
    max_depth: float = field(default=20.0, metadata={'help': 'farther depth (metres) is no point'})
    sync_slop: float = field(default=0.1, metadata={
        'help': 'largest stamp difference (s) between an image and its depth; an image without one is 2D only'})
    exact_sync: bool = field(default=False, metadata={'help': 'the depth stamp must equal the image stamp'})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field.

        Only values are checked, never files: weight files are looked up (and missing ones reported)
        when the models are loaded (:mod:`trident_ros.models.weights`).
        """
        def fail(name: str, why: str) -> None:
            raise ConfigError(f'{name}={getattr(self, name)!r}: {why}')

        if self.method not in METHODS:
            fail('method', f'must be one of {", ".join(METHODS)}')
        if self.sam_model not in SAM_MODELS:
            fail('sam_model', f'must be one of {", ".join(SAM_MODELS)}')
        if self.model_scale not in MODEL_SCALES:
            fail('model_scale', f'must be one of {", ".join(MODEL_SCALES)}')
        if self.model_scale == 'tiny' and not self.random_weights:
            fail('model_scale', "'tiny' architectures have no trained weights: set random_weights too")
        if not (self.device in DEVICES or (self.device.startswith('cuda:') and self.device[5:].isdigit())):
            fail('device', 'must be auto, cpu, cuda or cuda:N')
        for name in ('slide_crop', 'slide_stride', 'clip_slide_crop', 'clip_slide_stride', 'aggregation_chunk',
                     'text_cache_size', 'max_classes', 'max_long_side'):
            if getattr(self, name) <= 0:
                fail(name, 'must be positive')
        for crop, stride in (('slide_crop', 'slide_stride'), ('clip_slide_crop', 'clip_slide_stride')):
            if getattr(self, stride) > getattr(self, crop):
                fail(stride, f'must not exceed {crop}={getattr(self, crop)} (windows would leave gaps)')
            if getattr(self, crop) % PATCH_SIZE:
                fail(crop, f'must be a multiple of the patch size {PATCH_SIZE}')
        if not 0.0 <= self.reuse_threshold <= 255.0:
            fail('reuse_threshold', 'must be in [0, 255] (0: off)')
        if self.input_short_side < 0:
            fail('input_short_side', 'must be >= 0 (0: original size)')
        if self.cliptrase_eps < 0 or self.cliptrase_min_samples < 0:
            fail('cliptrase_eps' if self.cliptrase_eps < 0 else 'cliptrase_min_samples', 'must be >= 0 (0: auto)')
        if self.resclip_sfr_tau <= 0:
            fail('resclip_sfr_tau', 'must be > 0')
        for name in ('prob_thd', 'coarse_thresh', 'area_thd', 'resclip_rcs_lambda',
                     'resclip_sfr_lambda', 'resclip_temp_thd'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                fail(name, 'must be in [0, 1]')
        if not math.isfinite(self.sam_iou_thresh):
            fail('sam_iou_thresh', "must be a finite number: SAM masks whose predicted IoU exceeds it are kept (SAM's "
                                   'prediction is not bounded to [0, 1]; below every prediction keeps every mask, '
                                   'above every prediction keeps none)')
        for name in ('logit_scale', 'gamma', 'cos_fac'):
            if not getattr(self, name) > 0:
                fail(name, 'must be > 0')
        if self.beta < 0 or self.sam_mask_coff < 0:
            fail('beta' if self.beta < 0 else 'sam_mask_coff', 'must be >= 0')
        if not self.depth_scale > 0:
            fail('depth_scale', 'must be > 0')
        if not 0.0 <= self.min_depth < self.max_depth:
            fail('min_depth' if self.min_depth < 0 else 'max_depth', 'needs 0 <= min_depth < max_depth')
        if self.sync_slop < 0:
            fail('sync_slop', 'must be >= 0')
        if self.minimal_area < 1:
            fail('minimal_area', 'must be >= 1')

    def replace(self, **changes: Any) -> TridentConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TridentConfig:
        """Build from a mapping (e.g. YAML); unknown keys are an error, values are type-checked.

        The mapping's method brings its preset (:func:`.presets.with_presets`) for the fields it lacks.
        """
        from trident_ros.methods.presets import with_presets

        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f'unknown config keys: {", ".join(unknown)}')
        typed = {}
        for name, value in with_presets(values, known['method'].default).items():
            default = known[name].default
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ConfigError(f'{name}={value!r}: must be true or false')
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f'{name}={value!r}: must be a number')
                if isinstance(default, int) and not float(value).is_integer():
                    raise ConfigError(f'{name}={value!r}: must be an integer')
                value = type(default)(value)
            if isinstance(default, str) and not isinstance(value, str):
                raise ConfigError(f'{name}={value!r}: must be a string')
            typed[name] = value
        return cls(**typed)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> TridentConfig:
        """Load a YAML mapping of config keys (a ROS params file's ``ros__parameters`` also works).

        ``overrides`` (e.g. command-line options) replace the file's values before the method's
        preset fills in the fields neither gives.
        """
        import yaml

        with open(path, encoding='utf-8') as stream:
            data = yaml.safe_load(stream) or {}
        if not isinstance(data, dict):
            raise ConfigError(f'{path}: expected a mapping of config keys')
        # accept a ROS 2 parameters file: {node_name: {ros__parameters: {...}}}
        names = {f.name for f in dataclasses.fields(cls)}
        for value in data.values():
            if isinstance(value, dict) and 'ros__parameters' in value:
                data = {k: v for k, v in value['ros__parameters'].items() if k in names}
                break
        return cls.from_dict({**data, **(overrides or {})})

    @staticmethod
    def describe(name: str) -> str:
        """The help text of field ``name``."""
        return {f.name: f.metadata.get('help', '') for f in dataclasses.fields(TridentConfig)}[name]
