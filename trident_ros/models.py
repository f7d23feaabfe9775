"""The three encoders (CLIP, DINO, SAM) on unmodified open_clip / timm / segment-anything modules.

The wrappers only reuse the upstream modules and their weights: :class:`ClipDense` runs CLIP's
vision tower up to the value path of its last block, :class:`DinoPatches` gives DINO's normed
last-layer patch tokens with DINO's own position-embedding interpolation, and :class:`SamEncoder`
runs SAM's image encoder while a forward hook keeps the last block's q, k, v, from which
:class:`SamAttentionCapture` recomputes attention rows on demand.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TridentConfig
from .weights import (SMOKE_HINT, WeightsError, clip_weights_error, dino_checkpoint, dino_weights_error, load_into,
                      resolve_sam_checkpoint)

T = TypeVar('T')
log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAM_ROUND = 16  # the SAM branch sees the image with its sides rounded up to a multiple of this
_RANDOM_WEIGHTS_SEED = 0
_WEIGHT_SUFFIXES = ('.pt', '.pth', '.bin', '.safetensors', '.ckpt')


def interpolate_pos_embed(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a square grid of patch position embeddings the way DINO (and the reference's CLIP) do.

    ``interpolate(scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode='bicubic')`` of the ``n x n``
    grid; the scale factor, not the output size, sets the sampling positions, which is what makes
    this differ from an exact-size resize. Computed in float32.

    :param patch_pos: ``(n*n, D)`` embeddings of the patch tokens (no class token).
    :param grid: ``(gh, gw)`` patch grid of the input.
    :returns: ``(gh*gw, D)`` in the dtype of ``patch_pos``; ``patch_pos`` itself when the grid is ``n x n``.
    """
    count, dim = patch_pos.shape
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f'position embedding of {count} patches is not a square grid')
    if tuple(grid) == (side, side):
        return patch_pos
    gh, gw = grid
    square = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(square, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode='bicubic')
    if tuple(resized.shape[-2:]) != (gh, gw):
        raise ValueError(f'position embedding resized to {tuple(resized.shape[-2:])}, expected {(gh, gw)}')
    return resized.permute(0, 2, 3, 1).reshape(gh * gw, dim).to(patch_pos.dtype)


def _patch_grid(images: torch.Tensor, patch: int, what: str) -> tuple[int, int]:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f'{what}: expected crops (B, 3, h, w), got {tuple(images.shape)}')
    h, w = images.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f'{what}: crop size {h}x{w} is not a multiple of the patch size {patch}')
    return h // patch, w // patch


class ClipDense:
    """Dense CLIP features from an open_clip ``CLIP`` (QuickGELU) vision tower.

    Attributes: ``model`` (the upstream CLIP; its text tower is used for the vocabulary), ``heads``,
    ``width`` (D), ``embed_dim`` (E), ``patch_size``, ``mean``/``std`` (CLIP normalisation).
    """

    mean = CLIP_MEAN
    std = CLIP_STD

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.visual = model.visual
        self.last_block = self.visual.transformer.resblocks[-1]
        self.heads: int = self.last_block.attn.num_heads
        self.width: int = self.visual.transformer.width
        self.embed_dim: int = self.visual.output_dim
        self.patch_size: int = self.visual.patch_size[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def _tokens_before_last_block(self, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, 1 + gh*gw, D)`` tokens (class token first) entering the last block."""
        visual = self.visual
        grid = _patch_grid(crops, self.patch_size, 'ClipDense')
        x = visual.conv1(crops.to(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        pos = visual.positional_embedding
        pos = torch.cat([pos[:1], interpolate_pos_embed(pos[1:], grid)], dim=0)
        x = x + pos.to(x.dtype)
        x = visual.patch_dropout(x)
        x = visual.ln_pre(x)
        batch_first = getattr(visual.transformer, 'batch_first', True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        return x, grid

    @torch.inference_mode()
    def last_block_values(self, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Values of the last block's attention for the patch tokens of normalised crops.

        Every block but the last runs as usual (position embedding interpolated to the crop); the
        last block's value projection is applied to ``ln_1(x)``, and the class token is dropped.

        :param crops: ``(B, 3, h, w)``, CLIP-normalised, ``h`` and ``w`` multiples of the patch size.
        :returns: ``values (B, heads, gh*gw, D/heads)`` and the grid ``(gh, gw)``.
        """
        x, grid = self._tokens_before_last_block(crops)
        attn = self.last_block.attn
        dim = self.width
        v = F.linear(self.last_block.ln_1(x[:, 1:]), attn.in_proj_weight[2 * dim:], attn.in_proj_bias[2 * dim:])
        batch, tokens, _ = v.shape
        return v.reshape(batch, tokens, self.heads, dim // self.heads).permute(0, 2, 1, 3), grid

    @torch.inference_mode()
    def attention_output(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention output projection: ``(..., D) -> (..., D)``."""
        return self.last_block.attn.out_proj(x.to(self.dtype))

    @torch.inference_mode()
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` and the visual projection: ``(..., D) -> (..., E)``."""
        return self.visual.ln_post(x.to(self.dtype)) @ self.visual.proj


class DinoPatches:
    """Patch features of a timm ``VisionTransformer`` (DINO): last layer, normed, class token dropped.

    The position embedding is resized with DINO's own rule (:func:`interpolate_pos_embed`), not
    timm's dynamic-size path. ``mean``/``std``: ImageNet normalisation.
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, model: nn.Module) -> None:
        if getattr(model, 'cls_token', None) is None or getattr(model, 'no_embed_class', False) \
                or getattr(model, 'reg_token', None) is not None:
            raise ValueError('DinoPatches needs a timm ViT with a class token in its position embedding '
                             'and no register tokens (as DINO)')
        self.model = model
        self.patch_size: int = model.patch_embed.patch_size[0]
        self.dim: int = model.embed_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    @torch.inference_mode()
    def patch_features(self, crops: torch.Tensor) -> torch.Tensor:
        """:param crops: ``(B, 3, h, w)`` ImageNet-normalised, sides multiples of the patch size.
        :returns: ``(B, gh*gw, C)`` normed last-layer patch tokens (row-major grid)."""
        model = self.model
        grid = _patch_grid(crops, self.patch_size, 'DinoPatches')
        x = model.patch_embed.proj(crops.to(self.dtype))
        x = model.patch_embed.norm(x.flatten(2).transpose(1, 2))
        pos = model.pos_embed[0]
        pos = torch.cat([pos[:1], interpolate_pos_embed(pos[1:], grid)], dim=0)
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = model.pos_drop(x + pos.to(x.dtype))
        x = model.norm_pre(model.patch_drop(x))
        x = model.norm(model.blocks(x))
        return x[:, 1:]


@dataclass
class SamAttentionCapture:
    """The last SAM encoder block's attention inputs, captured during one image encoding.

    ``q``, ``k``, ``v``: ``(heads, G, G, hd)`` (G x G: the padded token grid, 64 x 64 at full scale);
    ``rel_h``: ``(G, G, hd)`` relative-position table of the rows (query row, key row), ``rel_w``
    likewise for columns, as segment-anything's ``get_rel_pos`` gives them; ``scale``: hd ** -0.5;
    ``valid``: ``(hs, ws)`` token grid of the unpadded image (``input_size // 16``, as the reference).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rel_h: torch.Tensor
    rel_w: torch.Tensor
    scale: float
    valid: tuple[int, int]

    @property
    def heads(self) -> int:
        return self.q.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.q.shape[1], self.q.shape[2]

    @torch.inference_mode()
    def attention_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the query tokens ``rows`` over all keys, as the upstream block computes.

        ``softmax(q*scale @ k^T + rel_h[row of query, row of key] + rel_w[col of query, col of key])``.

        :param rows: ``(R,)`` LongTensor of flat indices into the ``G*G`` grid.
        :returns: ``(heads, R, G*G)``.
        """
        heads, gh, gw, hd = self.q.shape
        rows = rows.to(self.q.device)
        q = self.q.reshape(heads, gh * gw, hd)[:, rows]
        k = self.k.reshape(heads, gh * gw, hd)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias_h = torch.einsum('hrc,rkc->hrk', q, self.rel_h[rows // gw])
        bias_w = torch.einsum('hrc,rkc->hrk', q, self.rel_w[rows % gw])
        attn = attn.view(heads, len(rows), gh, gw) + bias_h[..., :, None] + bias_w[..., None, :]
        return attn.view(heads, len(rows), gh * gw).softmax(dim=-1)


@dataclass
class SamImage:
    """One image through SAM's encoder.

    ``embedding``: ``(1, C, G, G)`` float32 image embedding (C = 256 at full scale), for the prompt
    decoder; ``attention``: the last block's capture; ``input_size``: ``(h, w)`` after the
    longest-side transform; ``original_size``: ``(H, W)`` of the image given to :meth:`SamEncoder.encode`;
    ``rounded_size``: ``(H16, W16)``, its sides rounded up to multiples of 16 (what the transform saw).
    """

    embedding: torch.Tensor
    attention: SamAttentionCapture
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    rounded_size: tuple[int, int]


class SamEncoder:
    """A segment-anything ``Sam`` (``model``) whose image encoder also hands back its last block's attention.

    :meth:`encode` prepares the image as the reference does (sides rounded up to multiples of 16 by
    a bilinear resize, then the predictor's ``ResizeLongestSide``, normalisation and padding) and
    runs the unmodified encoder; a forward hook on the last block's ``attn.qkv`` keeps its output.
    """

    def __init__(self, model: nn.Module) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        encoder = model.image_encoder
        self.last_attn = encoder.blocks[-1].attn
        if encoder.blocks[-1].window_size != 0 or not self.last_attn.use_rel_pos:
            raise ValueError('SamEncoder needs a global-attention last block with relative positions')
        self.patch_size: int = encoder.patch_embed.proj.kernel_size[0]
        self.transform = ResizeLongestSide(encoder.img_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.image_encoder.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.image_encoder.patch_embed.proj.weight.device

    def resize(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Round the sides of an ``(H, W, 3)`` uint8 RGB image up to multiples of 16 (cv2 bilinear
        resize; unchanged if they are) and apply the longest-side transform.

        :returns: the ``(h, w, 3)`` uint8 image before normalisation and padding, and the rounded
            size ``(H16, W16)``.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'SamEncoder: expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}')
        height, width = image.shape[:2]
        rounded = (-(-height // SAM_ROUND) * SAM_ROUND, -(-width // SAM_ROUND) * SAM_ROUND)
        if rounded != (height, width):
            import cv2

            image = cv2.resize(image, (rounded[1], rounded[0]), interpolation=cv2.INTER_LINEAR)
        return self.transform.apply_image(image), rounded

    def _encoder_input(self, resized: np.ndarray) -> torch.Tensor:
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.model.preprocess(pixels).to(self.dtype)

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """The image encoder's input for an ``(H, W, 3)`` uint8 RGB image: ``(1, 3, S, S)``
        normalised and padded (S = 1024 at full scale), in the encoder's dtype and device."""
        return self._encoder_input(self.resize(image)[0])

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> SamImage:
        """:param image: ``(H, W, 3)`` uint8 RGB.
        :returns: the :class:`SamImage` (embedding, attention capture, sizes)."""
        resized, rounded = self.resize(image)
        captured: dict[str, torch.Tensor] = {}

        def keep_qkv(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            captured['qkv'] = output

        hook = self.last_attn.qkv.register_forward_hook(keep_qkv)
        try:
            embedding = self.model.image_encoder(self._encoder_input(resized))
        finally:
            hook.remove()
        input_size = (resized.shape[0], resized.shape[1])
        attention = self._capture(captured['qkv'], input_size)
        return SamImage(embedding=embedding.float(), attention=attention, input_size=input_size,
                        original_size=(image.shape[0], image.shape[1]), rounded_size=rounded)

    def _capture(self, qkv: torch.Tensor, input_size: tuple[int, int]) -> SamAttentionCapture:
        """Split the last block's ``qkv`` output ``(1, G, G, 3*dim)`` as the block does."""
        from segment_anything.modeling.image_encoder import get_rel_pos

        attn = self.last_attn
        _, gh, gw, _ = qkv.shape
        q, k, v = qkv.reshape(gh * gw, 3, attn.num_heads, -1).permute(1, 2, 0, 3).unbind(0)
        shape = (attn.num_heads, gh, gw, q.shape[-1])
        return SamAttentionCapture(
            q=q.reshape(shape), k=k.reshape(shape), v=v.reshape(shape),
            rel_h=get_rel_pos(gh, gh, attn.rel_pos_h), rel_w=get_rel_pos(gw, gw, attn.rel_pos_w),
            scale=attn.scale,
            valid=(input_size[0] // self.patch_size, input_size[1] // self.patch_size))


@dataclass
class TridentModels:
    """The loaded encoders, the CLIP tokenizer, and where/how they run."""

    clip: ClipDense
    dino: DinoPatches
    sam: SamEncoder
    tokenizer: Callable[..., torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    weights: str

    def describe(self) -> str:
        """One log line: which weights, device and dtype."""
        return f'models: {self.weights}; device {self.device}, {str(self.dtype).replace("torch.", "")}'


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA if available, else CPU; ``cuda``/``cuda:N`` must be available."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f'device={name!r} but CUDA is not available (use device: auto or cpu)')
    return device


def load_models(config: TridentConfig) -> TridentModels:
    """Build CLIP, DINO and SAM for ``config``, in eval mode, on its device and dtype.

    ``config.random_weights``: random weights (a fixed seed, so runs repeat), nothing is read or
    downloaded, and a loud warning says that labels are meaningless. Otherwise every weight file is
    resolved before any model is built; a missing one raises :class:`WeightsError` (never a silent
    fallback to random weights). ``config.model_scale == 'tiny'``: small configurations of the same
    architectures (tests and smoke runs). fp16 on CUDA when ``config.fp16``, fp32 on the CPU.
    """
    import open_clip

    device = resolve_device(config.device)
    dtype = torch.float16 if device.type == 'cuda' and config.fp16 else torch.float32
    if config.random_weights:
        log.warning('*** RANDOM WEIGHTS (smoke test): CLIP, DINO and SAM are untrained, every label and '
                    'mask is MEANINGLESS. Turn random_weights off for real segmentation. ***')
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_WEIGHTS_SEED)
            build = _build_tiny if config.model_scale == 'tiny' else _build_full_random
            clip, dino, sam = build(config)
        weights = f'RANDOM ({config.model_scale} {config.clip_model} / {config.dino_model} / SAM {config.sam_model})'
    else:
        clip, dino, sam, weights = _build_full_pretrained(config, device, dtype)
    clip = _finish(clip, device, dtype, clip_model=True)
    dino = _finish(dino, device, dtype)
    sam = _finish(sam, device, torch.float32)
    sam.image_encoder.to(dtype)
    return TridentModels(clip=ClipDense(clip), dino=DinoPatches(dino), sam=SamEncoder(sam),
                         tokenizer=open_clip.get_tokenizer(config.clip_model), device=device, dtype=dtype,
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


def _build_tiny(config: TridentConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Small configurations of the same architectures (random weights, about a second on a CPU)."""
    import timm
    from open_clip import CLIP, CLIPTextCfg, CLIPVisionCfg

    clip = CLIP(embed_dim=32,
                vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=224),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
                quick_gelu=True)
    dino = timm.create_model(config.dino_model, pretrained=False, embed_dim=48, depth=2, num_heads=2,
                             patch_size=16, img_size=224)
    return clip, dino, _tiny_sam()


def _tiny_sam() -> nn.Module:
    """A segment-anything ``Sam`` with a 2-block encoder (window attention, then global attention
    as the real last block), 256 px input (16 x 16 tokens), 32 channels."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    img_size, patch, dim = 256, 16, 32
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=patch, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=dim, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            rel_pos_zero_init=False, window_size=6, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(img_size // patch,) * 2,
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            transformer_dim=dim, num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=32,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def _build_full_random(config: TridentConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The paper's architectures with random weights (no file, no network)."""
    import open_clip
    import timm
    from segment_anything import sam_model_registry

    clip = open_clip.create_model(config.clip_model, pretrained=None, force_quick_gelu=True)
    dino = timm.create_model(config.dino_model, pretrained=False)
    return clip, dino, sam_model_registry[config.sam_model](checkpoint=None)


def _is_local_file(value: str) -> bool:
    return Path(value).suffix in _WEIGHT_SUFFIXES or '/' in value or value.startswith('~')


@dataclass
class WeightSources:
    """Where each model's weights come from, all checked present (see :func:`fetch_weights`)."""

    sam: Path
    dino: Path | None  # None: timm's hub cache (already fetched)
    clip: str  # a local file, or an open_clip pretrained tag whose file is in the hub cache

    def describe(self, config: TridentConfig) -> str:
        return (f'CLIP {config.clip_model} ({self.clip}), DINO {config.dino_model} '
                f'({self.dino or "timm hub cache"}), SAM {config.sam_model} ({self.sam})')


def fetch_weights(config: TridentConfig) -> WeightSources:
    """Find (or download, where allowed and reachable) every weight file ``config`` needs.

    Raises one :class:`WeightsError` that names EVERY missing file and where to put it, so a
    user offline learns all of them at once. Nothing is built here.
    """
    problems: list[str] = []

    def attempt(load: Callable[[], T]) -> T | None:
        try:
            return load()
        except WeightsError as error:
            problems.append(str(error).replace(f'\n  {SMOKE_HINT}', ''))
            return None

    sam_path = attempt(lambda: resolve_sam_checkpoint(config))
    dino_problems = len(problems)
    dino_path = attempt(lambda: dino_checkpoint(config))
    if dino_path is None and len(problems) == dino_problems:
        attempt(lambda: _fetch_hub_weights(config, 'timm'))
    clip_source = config.clip_pretrained
    if _is_local_file(clip_source):
        clip_file = Path(clip_source).expanduser()
        if not clip_file.is_file():
            problems.append(f'clip_pretrained {clip_file} does not exist (a local CLIP weight file, or an '
                            "open_clip tag such as 'openai').")
        clip_source = str(clip_file)
    else:
        attempt(lambda: _fetch_hub_weights(config, 'open_clip'))
    if problems:
        raise WeightsError('\n'.join(problems) + f'\n  {SMOKE_HINT}')
    return WeightSources(sam=sam_path, dino=dino_path, clip=clip_source)


def _fetch_hub_weights(config: TridentConfig, library: str) -> Path:
    """The Hugging Face hub file timm (DINO) or open_clip (CLIP) loads for ``config``: from the
    local hub cache, else downloaded (timm/open_clip then find it in the same cache)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if library == 'timm':
        import timm

        repo = getattr(timm.models.get_pretrained_cfg(config.dino_model), 'hf_hub_id', None)
        names, make_error = ('model.safetensors', 'pytorch_model.bin'), dino_weights_error
    else:
        import open_clip

        repo = (open_clip.get_pretrained_cfg(config.clip_model, config.clip_pretrained) or {}).get('hf_hub', '')
        repo = repo.rstrip('/')
        names, make_error = ('open_clip_model.safetensors', 'open_clip_pytorch_model.bin'), clip_weights_error
    if not repo:
        raise make_error(config, FileNotFoundError(f'no Hugging Face hub file is known for these {library} weights'))
    for name in names:
        cached = try_to_load_from_cache(repo, name)
        if isinstance(cached, str):
            return Path(cached)
    if not _hub_reachable():
        raise make_error(config, ConnectionError('the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set) and '
                                                 'the file is not in its local cache'))
    last_error: Exception = FileNotFoundError(repo)
    for name in names:
        try:
            return Path(hf_hub_download(repo, name))
        except Exception as error:  # offline, missing entry, HTTP errors: try the next name
            last_error = error
    raise make_error(config, last_error)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (the hub client would retry for ~25 s per file)."""
    import socket
    import urllib.parse

    if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on'):
        return False
    endpoint = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _build_full_pretrained(config: TridentConfig, device: torch.device,
                           dtype: torch.dtype) -> tuple[nn.Module, nn.Module, nn.Module, str]:
    """The paper's architectures with their weights; every file is found before anything is built."""
    from segment_anything import sam_model_registry

    sources = fetch_weights(config)
    sam = sam_model_registry[config.sam_model](checkpoint=None)
    load_into(sam, sources.sam, f'SAM {config.sam_model}')
    dino = _build_dino(config, sources.dino)
    clip = _build_clip(config, sources.clip, device, dtype)
    return clip, dino, sam, sources.describe(config)


def _build_dino(config: TridentConfig, dino_path: Path | None) -> nn.Module:
    import timm

    if dino_path is not None:
        dino = timm.create_model(config.dino_model, pretrained=False)
        load_into(dino, dino_path, f'DINO {config.dino_model}')
        return dino
    try:
        return timm.create_model(config.dino_model, pretrained=True)
    except Exception as error:  # timm/hub raise many types when offline
        raise dino_weights_error(config, error) from error


def _build_clip(config: TridentConfig, clip_source: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import open_clip

    try:
        return open_clip.create_model(config.clip_model, pretrained=clip_source, force_quick_gelu=True,
                                      precision='fp16' if dtype == torch.float16 else 'fp32', device=device)
    except Exception as error:  # open_clip wraps download/load failures in RuntimeError and others
        raise clip_weights_error(config, error) from error
