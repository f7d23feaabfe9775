"""Which models a method needs, where and in which dtype they run, and building them.

:func:`load_models` builds the encoders ``config.method`` needs
(:attr:`~trident_ros.config.TridentConfig.method_models`)
with their weights (found by :func:`trident_ros.models.weights.fetch_weights` before anything is built),
with random weights for smoke tests, or as tiny configurations of the same architectures (tests).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from trident_ros.errors import ConfigError
from trident_ros.models.clip import ClipDense
from trident_ros.models.dino import DinoPatches
from trident_ros.models.sam import SamEncoder
from trident_ros.models.weight_files import load_into
from trident_ros.models.weights import SMOKE_HINT, ModelSettings, WeightsError, fetch_weights, weights_dir

log = logging.getLogger(__package__)  # trident_ros.models

_RANDOM_WEIGHTS_SEED = 0
TINY_PATCH = 16
"""Patch size of the tiny test architectures (CLIP, DINO and SAM alike)."""
OPEN_CLIP_PRECISION = {torch.float16: 'fp16', torch.bfloat16: 'bf16', torch.float32: 'fp32'}


@dataclass
class TridentModels:
    """The loaded encoders, the CLIP tokenizer, and where/how they run.

    ``dino`` and ``sam`` are None when the configured method does not need them (see
    :attr:`~trident_ros.config.TridentConfig.method_models`): a CLIP-only method loads neither, ``proxy`` loads no SAM.
    """

    clip: ClipDense
    dino: DinoPatches | None
    sam: SamEncoder | None
    tokenizer: Callable[..., torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    weights: str

    @property
    def loaded(self) -> tuple[str, ...]:
        """Names of the loaded models, e.g. ``('clip', 'dino')``."""
        return tuple(name for name in ('clip', 'dino', 'sam') if getattr(self, name) is not None)

    def describe(self) -> str:
        """One log line: which weights, device and dtype."""
        return f'models: {self.weights}; device {self.device}, {str(self.dtype).replace("torch.", "")}'


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``device`` setting.

    Args:
        name: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The device.

    Raises:
        ConfigError: CUDA is asked for but not available, or there is no CUDA device N.
    """
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f'device={name!r}: {error}') from error
    if device.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f'device={name!r} but CUDA is not available (use device: auto or cpu)')
        if (device.index or 0) >= count:
            raise ConfigError(f'device={name!r}: this machine has {count} CUDA device(s)')
    return device


def encoder_dtype(config: ModelSettings, device: torch.device) -> torch.dtype:
    """fp16 on CUDA with ``config.models.fp16``, bf16 on the CPU with ``config.models.bf16``, else fp32."""
    if device.type == 'cuda' and config.models.fp16:
        return torch.float16
    if device.type == 'cpu' and config.models.bf16:
        return torch.bfloat16
    return torch.float32


def load_models(config: ModelSettings) -> TridentModels:
    """Build the models ``config.method`` needs, in eval mode, on its device and dtype.

    CLIP always; DINO and SAM where the method uses them (:attr:`~trident_ros.config.TridentConfig.method_models`).
    ``config.models.random_weights``: random weights (a fixed seed, so runs repeat), nothing is read or
    downloaded, and a loud warning says that labels are meaningless. Otherwise every weight file is
    found before any model is built (:func:`trident_ros.models.weights.fetch_weights`); a missing one raises
    ``WeightsError`` (never a silent fallback to random weights). ``config.models.model_scale == 'tiny'``:
    small configurations of the same architectures (tests and smoke runs). Encoders in fp16 on CUDA
    when ``config.models.fp16``, in bf16 on the CPU when ``config.models.bf16``, else fp32 (SAM's prompt encoder
    and mask decoder: always fp32).

    Args:
        config: the configuration.

    Returns:
        The loaded models.

    Raises:
        ConfigError: the device is not available.
        WeightsError: a weight file is missing, corrupt or of another model.
    """
    import open_clip

    device = resolve_device(config.models.device)
    dtype = encoder_dtype(config, device)
    needed = config.method_models
    if config.models.random_weights:
        names = {'clip': 'CLIP', 'dino': 'DINO', 'sam': 'SAM'}
        log.warning('*** RANDOM WEIGHTS (smoke test): %s untrained, every label and mask is MEANINGLESS. '
                    'Turn random_weights off for real segmentation. ***', ', '.join(names[n] for n in needed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_WEIGHTS_SEED)
            build = _build_tiny if config.models.model_scale == 'tiny' else _build_full_random
            clip, dino, sam = build(config, needed)
        settings = config.models
        described = {'clip': settings.clip_model, 'dino': settings.dino_model, 'sam': f'SAM {settings.sam_model}'}
        weights = f'RANDOM ({config.models.model_scale} {" / ".join(described[n] for n in needed)})'
    else:
        clip, dino, sam, weights = _build_full_pretrained(config, device, dtype)
    clip = _finish(clip, device, dtype, clip_model=True)
    if dino is not None:
        dino = _finish(dino, device, dtype)
    if sam is not None:
        sam = _finish(sam, device, torch.float32)
        sam.image_encoder.to(dtype)
    return TridentModels(clip=ClipDense(clip), dino=DinoPatches(dino) if dino is not None else None,
                         sam=SamEncoder(sam) if sam is not None else None,
                         tokenizer=open_clip.get_tokenizer(config.models.clip_model), device=device, dtype=dtype,
                         weights=weights)


def _finish(model: nn.Module, device: torch.device, dtype: torch.dtype, clip_model: bool = False) -> nn.Module:
    """Eval mode, no gradients, on ``device`` in ``dtype`` (CLIP: open_clip's mixed fp16 rule)."""
    import open_clip

    model.eval().requires_grad_(False).to(device)
    if clip_model:
        if dtype != torch.float32 and model.visual.conv1.weight.dtype != dtype:
            open_clip.convert_weights_to_lp(model, dtype=dtype)
    else:
        model.to(dtype)
    return model


Built = tuple[nn.Module, nn.Module | None, nn.Module | None]
"""(CLIP, DINO or None, SAM or None) upstream modules."""


def _build_tiny(config: ModelSettings, needed: tuple[str, ...]) -> Built:
    """Small configurations of the same architectures (random weights, about a second on a CPU).

    DINO and SAM only if ``needed`` names them (None otherwise). Built in the order CLIP, DINO, SAM,
    so a model's random weights do not depend on which others are built after it.
    """
    import timm
    from open_clip import CLIP, CLIPTextCfg, CLIPVisionCfg

    clip = CLIP(embed_dim=32,
                vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=TINY_PATCH, image_size=224),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
                quick_gelu=True)
    dino = (timm.create_model(config.models.dino_model, pretrained=False, embed_dim=48, depth=2, num_heads=2,
                              patch_size=TINY_PATCH, img_size=224) if 'dino' in needed else None)
    return clip, dino, tiny_sam() if 'sam' in needed else None


def tiny_sam() -> nn.Module:
    """A small segment-anything ``Sam`` (random weights).

    A 2-block encoder (window attention, then global attention as the real last block), 256 px
    input (16 x 16 tokens), 32 channels.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    img_size, dim = 256, 32
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=TINY_PATCH, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=dim, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            rel_pos_zero_init=False, window_size=6, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(img_size // TINY_PATCH,) * 2,
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            transformer_dim=dim, num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def _build_full_random(config: ModelSettings, needed: tuple[str, ...]) -> Built:
    """The paper's architectures with random weights (no file, no network); DINO and SAM only if needed."""
    import open_clip
    import timm
    from segment_anything import sam_model_registry

    clip = open_clip.create_model(config.models.clip_model, pretrained=None, force_quick_gelu=clip_quick_gelu(config))
    dino = timm.create_model(config.models.dino_model, pretrained=False) if 'dino' in needed else None
    sam = sam_model_registry[config.models.sam_model](checkpoint=None) if 'sam' in needed else None
    return clip, dino, sam


def _build_full_pretrained(config: ModelSettings, device: torch.device,
                           dtype: torch.dtype) -> tuple[nn.Module, nn.Module | None, nn.Module | None, str]:
    """The paper's architectures with their weights, only those ``config.method`` needs.

    Every file is found before anything is built.
    """
    from segment_anything import sam_model_registry

    sources = fetch_weights(config)
    sam = None
    if 'sam' in sources.models:
        sam = sam_model_registry[config.models.sam_model](checkpoint=None)
        load_into(sam, sources.sam, f'SAM {config.models.sam_model}')
    dino = _build_dino(config, sources.dino) if 'dino' in sources.models else None
    clip = _build_clip(config, sources.clip, device, dtype)
    return clip, dino, sam, sources.describe(config)


def _build_dino(config: ModelSettings, dino_path: Path | None) -> nn.Module:
    import timm

    if dino_path is not None:
        dino = timm.create_model(config.models.dino_model, pretrained=False)
        load_into(dino, dino_path, f'DINO {config.models.dino_model}')
        return dino
    try:
        return timm.create_model(config.models.dino_model, pretrained=True)
    except Exception as error:  # timm/hub raise many types when offline
        raise dino_weights_error(config, error) from error


def clip_quick_gelu(config: ModelSettings) -> bool:
    """Whether the configured CLIP uses QuickGELU: OpenAI's weights do, LAION's (e.g. ViT-H-14) do not.

    A pretrained tag open_clip knows says so itself; a local file counts as OpenAI's weights when
    OpenAI released that architecture (``openai`` is one of its tags).
    """
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tag_cfg = get_pretrained_cfg(config.models.clip_model, config.models.clip_pretrained)
    if tag_cfg:
        return bool(tag_cfg.get('quick_gelu', False))
    return 'openai' in list_pretrained_tags_by_model(config.models.clip_model)


def _build_clip(config: ModelSettings, clip_source: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import open_clip

    try:
        return open_clip.create_model(config.models.clip_model, pretrained=clip_source,
                                      force_quick_gelu=clip_quick_gelu(config), precision=OPEN_CLIP_PRECISION[dtype],
                                      device=device)
    except Exception as error:  # open_clip wraps download/load failures in RuntimeError and others
        raise clip_weights_error(config, error) from error


def dino_weights_error(config: ModelSettings, error: Exception) -> WeightsError:
    """The ``WeightsError`` for timm failing to provide ``config.models.dino_model``'s weights."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(config.models.dino_model)
    sources = []
    if cfg is not None and cfg.hf_hub_id:
        sources.append(f'the Hugging Face repo {cfg.hf_hub_id} (file model.safetensors)')
    if cfg is not None and cfg.url:
        sources.append(f'{cfg.url}')
    where = weights_dir(config) / (cfg.url.rsplit('/', 1)[-1] if cfg is not None and cfg.url else 'dino.pth')
    return WeightsError(
        f'timm could not load the pretrained weights of {config.models.dino_model} ({type(error).__name__}: {error}).\n'
        f'  Fetch ' + (' or '.join(sources) or 'the DINO weights') + ' on a machine with network access,\n'
        f'  then set models.dino_checkpoint to the local file, or put DINO\'s file at {where}.\n  {SMOKE_HINT}')


def clip_weights_error(config: ModelSettings, error: Exception) -> WeightsError:
    """The ``WeightsError`` for open_clip failing to provide ``config.models.clip_pretrained``.

    It points at the Hugging Face file open_clip itself fetches for the tag (OpenAI's own ``.pt``
    is a TorchScript archive, which loading with ``weights_only=True`` refuses).
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(config.models.clip_model, config.models.clip_pretrained) or {}
    if cfg.get('hf_hub'):
        repo, file_name = os.path.split(cfg['hf_hub'])
        source = f'https://huggingface.co/{repo}/resolve/main/{file_name or "open_clip_model.safetensors"}'
    else:
        source = cfg.get('url') or (f'the open_clip weights of {config.models.clip_model} '
                                    f'({config.models.clip_pretrained})')
    local_name = source.rsplit('/', 1)[-1] if '/' in source else 'clip_weights.safetensors'
    return WeightsError(
        f'open_clip could not load CLIP weights {config.models.clip_pretrained!r} for {config.models.clip_model} '
        f'({type(error).__name__}: {error}).\n'
        f'  Fetch {source}\n'
        f'  on a machine with network access, copy it here and set models.clip_pretrained to its path '
        f'(e.g. models.clip_pretrained: {weights_dir(config) / local_name}).\n  {SMOKE_HINT}')
