"""The three encoders (CLIP, DINO, SAM) on unmodified open_clip / timm / segment-anything modules.

The wrappers only reuse the upstream modules and their weights: :class:`ClipDense` runs CLIP's
vision tower up to the value path of its last block, :class:`DinoPatches` gives DINO's normed
last-layer patch tokens with DINO's own position-embedding interpolation, and :class:`SamEncoder`
runs SAM's image encoder, handing the attention of its last block, block by block of query rows
as the block computes it, to an :class:`AttentionObserver` (aggregation).
:class:`SamChunkedAttention` and :class:`SamChunkedMlp` stand in for each encoder block's
``attn`` and ``mlp`` (same weights, same result) so that the global blocks never hold their whole
``(heads, 4096, 4096)`` attention matrix.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIP_BLOCK_METHODS, CLIP_ONLY_METHODS, TridentConfig
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


@dataclass
class ClipLastBlock:
    """What enters CLIP's last block for a batch of crops, and its attention inputs.

    ``x``: ``(B, 1 + gh*gw, D)`` tokens entering the block, class token first (the residual stream);
    ``q``, ``k``, ``v``: ``(B, heads, 1 + gh*gw, D/heads)``, the block's in-projection of ``ln_1(x)``
    split into heads (no scaling applied); ``scale``: ``(D/heads) ** -0.5``; ``grid``: ``(gh, gw)``.
    """

    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    grid: tuple[int, int]


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
    def last_block_qkv(self, crops: torch.Tensor) -> ClipLastBlock:
        """The last block's input and its query, key and value heads, class token included.

        Every block but the last runs as usual (position embedding interpolated to the crop).

        :param crops: ``(B, 3, h, w)``, CLIP-normalised, ``h`` and ``w`` multiples of the patch size.
        :returns: :class:`ClipLastBlock` (token 0 is the class token).
        """
        x, grid = self._tokens_before_last_block(crops)
        attn = self.last_block.attn
        qkv = F.linear(self.last_block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (B, T, 3D)
        batch, tokens, _ = qkv.shape
        head_dim = self.width // self.heads
        q, k, v = qkv.reshape(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return ClipLastBlock(x=x, q=q, k=k, v=v, scale=head_dim ** -0.5, grid=grid)

    @torch.inference_mode()
    def residual_feed_forward(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the last block after its attention: the residual, then the feed-forward branch.

        ``h = x + ls_1(attended)``; returns ``h + ls_2(mlp(ln_2(h)))`` (``ls_*``: identity for OpenAI CLIP).

        :param x: ``(..., D)`` the block's input; :param attended: ``(..., D)`` attention output
            (after ``out_proj``). :returns: ``(..., D)``.
        """
        block = self.last_block
        h = x + block.ls_1(attended.to(x.dtype))
        return h + block.ls_2(block.mlp(block.ln_2(h)))

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


class AttentionObserver(Protocol):
    """Receives the attention of a :class:`SamChunkedAttention` global block while it runs."""

    def start(self, v: torch.Tensor) -> None:
        """Called once, before any rows: ``v`` ``(heads, H, W, hd)``, the values of the whole grid."""

    def rows(self, rows: slice, attention: torch.Tensor) -> None:
        """Called per block of query rows, in order: ``attention`` ``(heads, len(rows) * W, H * W)``,
        the softmax attention of the queries in image rows ``rows`` over all keys (read only)."""


SAM_BLOCK_ELEMENTS = 1 << 21
"""Most elements of the attention logits (or MLP hidden units) the chunked SAM encoder blocks
compute at once on the CPU: 8 MiB in fp32. An attention block is never smaller than one image row
(the full-size global blocks: 12 heads x 64 x 4096 = 3.1 M logits)."""
SAM_BLOCK_ELEMENTS_CUDA = 1 << 25
"""The same on CUDA (64 MiB in fp16: 10 image rows of a global block), where many small blocks
would cost kernel launches (not measured: no GPU was available to this project so far)."""


class SamChunkedAttention(nn.Module):
    """segment-anything's image-encoder ``Attention``, computed a block of query rows at a time.

    Built from an upstream ``Attention``, it holds that module's own ``qkv``, ``proj``, ``rel_pos_h``
    and ``rel_pos_w`` (the same objects, so the same weights and ``state_dict`` names) and computes what
    the upstream ``forward`` does -- ``(q * scale) @ k^T``, the decomposed relative-position terms added
    in the same order, softmax, ``@ v``, ``proj`` -- on blocks of whole image rows (global blocks) or
    of several windows (window blocks) holding at most ``max_elements`` logits, reading q, k, v as
    views of the ``qkv`` output. The upstream module holds the whole ``(B*heads, H*W, H*W)`` logits and
    two same-size copies: 2.3 GB per global block of SAM ViT-B at 1024 x 1024 in fp32. Every query row
    goes through the same operations, so the output equals the upstream module's (bit for bit on this
    project's CPU; see test_models.py and docs/performance.md).
    """

    def __init__(self, upstream: nn.Module, max_elements: int = SAM_BLOCK_ELEMENTS) -> None:
        super().__init__()
        if max_elements < 1:
            raise ValueError(f'max_elements must be >= 1, got {max_elements}')
        self.num_heads: int = upstream.num_heads
        self.scale: float = upstream.scale
        self.use_rel_pos: bool = upstream.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = upstream.rel_pos_h
            self.rel_pos_w = upstream.rel_pos_w
        self.qkv = upstream.qkv
        self.proj = upstream.proj
        self.max_elements = max_elements
        self.observer: AttentionObserver | None = None
        """Set (for one forward of a global block) to receive its attention; see :class:`SamEncoder`."""

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, use_rel_pos={self.use_rel_pos}, max_elements={self.max_elements}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``(B, H, W, C)`` tokens (B: windows of a window block, 1 for a global block).
        :returns: ``(B, H, W, C)``, as the upstream ``Attention``."""
        from segment_anything.modeling.image_encoder import get_rel_pos

        batch, height, width, channels = x.shape
        heads, count = self.num_heads, height * width
        qkv = self.qkv(x).reshape(batch, count, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, H*W, hd) views
        observer = self.observer
        if observer is not None:
            if batch != 1:
                raise ValueError(f'an attention observer needs a global block (one image), got {batch} windows')
            observer.start(v[0].unflatten(1, (height, width)))
        if self.use_rel_pos:
            rel_h = get_rel_pos(height, height, self.rel_pos_h)  # (H, H, hd)
            rel_w = get_rel_pos(width, width, self.rel_pos_w)  # (W, W, hd)
        out = x.new_empty(batch, count, heads, channels // heads)
        for images, rows in self.blocks(batch, height, width):
            tokens = slice(rows.start * width, rows.stop * width)
            q_part = q[images, :, tokens]  # (b, heads, rows*W, hd)
            attn = (q_part * self.scale) @ k[images].transpose(-2, -1)  # (b, heads, rows*W, H*W)
            if self.use_rel_pos:
                grid_q = q_part.reshape(-1, rows.stop - rows.start, width, q.shape[-1])
                logits = attn.view(-1, rows.stop - rows.start, width, height, width)
                logits += torch.einsum('bhwc,hkc->bhwk', grid_q, rel_h[rows])[..., :, None]
                logits += torch.einsum('bhwc,wkc->bhwk', grid_q, rel_w)[..., None, :]
            attn = attn.softmax(dim=-1)
            if observer is not None:
                observer.rows(rows, attn[0])
            out[images, tokens] = (attn @ v[images]).transpose(1, 2)
        return self.proj(out.view(batch, height, width, channels))

    def blocks(self, batch: int, height: int, width: int) -> list[tuple[slice, slice]]:
        """``(images, image rows)`` blocks covering the input, each at most ``max_elements`` logits
        (but at least one image row of one image)."""
        per_row = self.num_heads * width * height * width
        rows_per_block = max(1, self.max_elements // per_row)
        if rows_per_block < height:
            return [(slice(b, b + 1), slice(y, min(y + rows_per_block, height)))
                    for b in range(batch) for y in range(0, height, rows_per_block)]
        images_per_block = max(1, rows_per_block // height)
        return [(slice(b, min(b + images_per_block, batch)), slice(0, height))
                for b in range(0, batch, images_per_block)]


class SamChunkedMlp(nn.Module):
    """segment-anything's ``MLPBlock`` (``lin2(act(lin1(x)))``), a block of tokens at a time.

    Holds the upstream module's own ``lin1``, ``act`` and ``lin2`` (same weights, same ``state_dict``
    names); at most ``max_elements`` hidden units exist at once instead of two ``(tokens, 4*C)``
    tensors (100 MB at 64 x 64 tokens for SAM ViT-B). Each token goes through the same operations.
    """

    def __init__(self, upstream: nn.Module, max_elements: int = SAM_BLOCK_ELEMENTS) -> None:
        super().__init__()
        if max_elements < 1:
            raise ValueError(f'max_elements must be >= 1, got {max_elements}')
        self.lin1 = upstream.lin1
        self.lin2 = upstream.lin2
        self.act = upstream.act
        self.max_elements = max_elements

    def extra_repr(self) -> str:
        return f'max_elements={self.max_elements}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:param x: ``(..., C)``. :returns: ``(..., C_out)``, as the upstream ``MLPBlock``."""
        tokens = x.reshape(-1, x.shape[-1])
        out = x.new_empty(tokens.shape[0], self.lin2.out_features)
        step = max(1, self.max_elements // self.lin1.out_features)
        for start in range(0, tokens.shape[0], step):
            out[start:start + step] = self.lin2(self.act(self.lin1(tokens[start:start + step])))
        return out.view(*x.shape[:-1], -1)


def use_chunked_blocks(encoder: nn.Module, max_elements: int = SAM_BLOCK_ELEMENTS) -> None:
    """Put a :class:`SamChunkedAttention` and a :class:`SamChunkedMlp` in place of the ``attn`` and
    ``mlp`` of every block of a segment-anything ``ImageEncoderViT`` (global and window blocks;
    modules already converted are left alone)."""
    for block in encoder.blocks:
        if not isinstance(block.attn, SamChunkedAttention):
            block.attn = SamChunkedAttention(block.attn, max_elements)
        if not isinstance(block.mlp, SamChunkedMlp):
            block.mlp = SamChunkedMlp(block.mlp, max_elements)


@dataclass
class SamImage:
    """One image through SAM's encoder.

    ``embedding``: ``(1, C, G, G)`` float32 image embedding (C = 256 at full scale), for the prompt
    decoder; ``input_size``: ``(h, w)`` after the
    longest-side transform; ``original_size``: ``(H, W)`` of the image given to :meth:`SamEncoder.encode`;
    ``rounded_size``: ``(H16, W16)``, its sides rounded up to multiples of 16 (what the transform saw).
    """

    embedding: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    rounded_size: tuple[int, int]


class SamEncoder:
    """A segment-anything ``Sam`` (``model``) whose image encoder also hands its last block's attention
    to an :class:`AttentionObserver`.

    :meth:`encode` prepares the image as the reference does (sides rounded up to multiples of 16 by
    a bilinear resize, then the predictor's ``ResizeLongestSide``, normalisation and padding) and
    runs the encoder. The last block's ``attn`` is always a :class:`SamChunkedAttention` (it hands
    its attention rows to the observer); with ``chunked`` (default) every other encoder block's
    ``attn`` and ``mlp`` are replaced too, in ``model`` itself (same weights, same output, a
    fraction of the memory: :func:`use_chunked_blocks`). They compute at most ``block_elements``
    logits at once (default: :data:`SAM_BLOCK_ELEMENTS`, on CUDA :data:`SAM_BLOCK_ELEMENTS_CUDA`;
    the model's device when this is built decides).
    """

    def __init__(self, model: nn.Module, chunked: bool = True, block_elements: int | None = None) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        encoder = model.image_encoder
        if block_elements is None:
            on_cuda = encoder.patch_embed.proj.weight.device.type == 'cuda'
            block_elements = SAM_BLOCK_ELEMENTS_CUDA if on_cuda else SAM_BLOCK_ELEMENTS
        if chunked:
            use_chunked_blocks(encoder, block_elements)
        last = encoder.blocks[-1]
        if last.window_size != 0 or not last.attn.use_rel_pos:
            raise ValueError('SamEncoder needs a global-attention last block with relative positions')
        if not isinstance(last.attn, SamChunkedAttention):
            last.attn = SamChunkedAttention(last.attn, block_elements)
        self.last_attn: SamChunkedAttention = last.attn
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
        rounded = self.rounded_size(image.shape[0], image.shape[1])
        if rounded != image.shape[:2]:
            import cv2

            image = cv2.resize(image, (rounded[1], rounded[0]), interpolation=cv2.INTER_LINEAR)
        return self.transform.apply_image(image), rounded

    def rounded_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H16, W16)``: the image's sides rounded up to multiples of 16, the short side raised for
        extreme aspect ratios (e.g. 1x10000) so that after the longest-side transform it still
        spans one SAM patch (the reference would crash there)."""
        long_side = -(-max(height, width) // SAM_ROUND) * SAM_ROUND
        floor = -(-long_side * self.patch_size // self.transform.target_length)
        return -(-max(height, floor) // SAM_ROUND) * SAM_ROUND, -(-max(width, floor) // SAM_ROUND) * SAM_ROUND

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(hs, ws)``: the unpadded token grid of an ``H x W`` image (``input_size // 16``, as the
        reference), known before encoding."""
        rounded = self.rounded_size(height, width)
        input_h, input_w = self.transform.get_preprocess_shape(rounded[0], rounded[1], self.transform.target_length)
        return input_h // self.patch_size, input_w // self.patch_size

    def _encoder_input(self, resized: np.ndarray) -> torch.Tensor:
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.model.preprocess(pixels).to(self.dtype)

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """The image encoder's input for an ``(H, W, 3)`` uint8 RGB image: ``(1, 3, S, S)``
        normalised and padded (S = 1024 at full scale), in the encoder's dtype and device."""
        return self._encoder_input(self.resize(image)[0])

    @torch.inference_mode()
    def encode(self, image: np.ndarray, observer: AttentionObserver | None = None) -> SamImage:
        """:param image: ``(H, W, 3)`` uint8 RGB.
        :param observer: receives the last block's values and attention rows during the encoding
            (:class:`AttentionObserver`; the grid is the padded one, :meth:`token_grid` its valid part).
        :returns: the :class:`SamImage` (embedding, sizes)."""
        resized, rounded = self.resize(image)
        self.last_attn.observer = observer
        try:
            embedding = self.model.image_encoder(self._encoder_input(resized))
        finally:
            self.last_attn.observer = None
        return SamImage(embedding=embedding.float(), input_size=(resized.shape[0], resized.shape[1]),
                        original_size=(image.shape[0], image.shape[1]), rounded_size=rounded)


METHOD_MODELS: dict[str, tuple[str, ...]] = {
    'trident': ('clip', 'dino', 'sam'),
    'trident_fast': ('clip', 'dino', 'sam'),
    'proxy': ('clip', 'dino'),
    **{method: ('clip',) for method in CLIP_ONLY_METHODS},
    **{method: ('clip',) for method in CLIP_BLOCK_METHODS},
}
"""The models each ``TridentConfig.method`` needs; :func:`load_models` builds only these."""


@dataclass
class TridentModels:
    """The loaded encoders, the CLIP tokenizer, and where/how they run.

    ``dino`` and ``sam`` are None when the configured method does not need them (see
    :data:`METHOD_MODELS`): a CLIP-only method loads neither, ``proxy`` loads no SAM.
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
    """``auto``: CUDA if available, else CPU; ``cuda``/``cuda:N`` must be available."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(f'device={name!r} but CUDA is not available (use device: auto or cpu)')
    return device


def load_models(config: TridentConfig) -> TridentModels:
    """Build the models ``config.method`` needs (CLIP; DINO, SAM where the method uses them, see
    :data:`METHOD_MODELS`), in eval mode, on its device and dtype.

    ``config.random_weights``: random weights (a fixed seed, so runs repeat), nothing is read or
    downloaded, and a loud warning says that labels are meaningless. Otherwise every weight file is
    resolved before any model is built; a missing one raises :class:`WeightsError` (never a silent
    fallback to random weights). ``config.model_scale == 'tiny'``: small configurations of the same
    architectures (tests and smoke runs). Encoders in fp16 on CUDA when ``config.fp16``, in bf16 on
    the CPU when ``config.bf16``, else fp32 (SAM's prompt encoder and mask decoder: always fp32).
    """
    import open_clip

    device = resolve_device(config.device)
    dtype = encoder_dtype(config, device)
    needed = METHOD_MODELS[config.method]
    if config.random_weights:
        names = {'clip': 'CLIP', 'dino': 'DINO', 'sam': 'SAM'}
        log.warning('*** RANDOM WEIGHTS (smoke test): %s untrained, every label and mask is MEANINGLESS. '
                    'Turn random_weights off for real segmentation. ***', ', '.join(names[n] for n in needed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_WEIGHTS_SEED)
            build = _build_tiny if config.model_scale == 'tiny' else _build_full_random
            clip, dino, sam = build(config, needed)
        described = {'clip': config.clip_model, 'dino': config.dino_model, 'sam': f'SAM {config.sam_model}'}
        weights = f'RANDOM ({config.model_scale} {" / ".join(described[n] for n in needed)})'
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
                         tokenizer=open_clip.get_tokenizer(config.clip_model), device=device, dtype=dtype,
                         weights=weights)


def encoder_dtype(config: TridentConfig, device: torch.device) -> torch.dtype:
    """fp16 on CUDA with ``config.fp16``, bf16 on the CPU with ``config.bf16``, else fp32."""
    if device.type == 'cuda' and config.fp16:
        return torch.float16
    if device.type == 'cpu' and config.bf16:
        return torch.bfloat16
    return torch.float32


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


def _build_tiny(config: TridentConfig,
                needed: tuple[str, ...]) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    """Small configurations of the same architectures (random weights, about a second on a CPU);
    DINO and SAM only if ``needed`` names them (None otherwise). Built in the order CLIP, DINO, SAM,
    so a model's random weights do not depend on which others are built after it."""
    import timm
    from open_clip import CLIP, CLIPTextCfg, CLIPVisionCfg

    clip = CLIP(embed_dim=32,
                vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=224),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
                quick_gelu=True)
    dino = (timm.create_model(config.dino_model, pretrained=False, embed_dim=48, depth=2, num_heads=2,
                              patch_size=16, img_size=224) if 'dino' in needed else None)
    return clip, dino, _tiny_sam() if 'sam' in needed else None


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


def _build_full_random(config: TridentConfig,
                       needed: tuple[str, ...]) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    """The paper's architectures with random weights (no file, no network); DINO and SAM only if
    ``needed`` names them (None otherwise)."""
    import open_clip
    import timm
    from segment_anything import sam_model_registry

    clip = open_clip.create_model(config.clip_model, pretrained=None, force_quick_gelu=True)
    dino = timm.create_model(config.dino_model, pretrained=False) if 'dino' in needed else None
    sam = sam_model_registry[config.sam_model](checkpoint=None) if 'sam' in needed else None
    return clip, dino, sam


def _is_local_file(value: str) -> bool:
    return Path(value).suffix in _WEIGHT_SUFFIXES or '/' in value or value.startswith('~')


@dataclass
class WeightSources:
    """Where each needed model's weights come from, all checked present (see :func:`fetch_weights`)."""

    models: tuple[str, ...]  # the models config.method needs (METHOD_MODELS)
    sam: Path | None  # None: SAM not needed
    dino: Path | None  # None: timm's hub cache (already fetched), or DINO not needed
    clip: str  # a local file, or an open_clip pretrained tag whose file is in the hub cache

    def describe(self, config: TridentConfig) -> str:
        parts = [f'CLIP {config.clip_model} ({self.clip})']
        if 'dino' in self.models:
            parts.append(f'DINO {config.dino_model} ({self.dino or "timm hub cache"})')
        if 'sam' in self.models:
            parts.append(f'SAM {config.sam_model} ({self.sam})')
        return ', '.join(parts)


def fetch_weights(config: TridentConfig) -> WeightSources:
    """Find (or download, where allowed and reachable) every weight file ``config`` needs: those
    of the models its ``method`` uses (:data:`METHOD_MODELS`), no others.

    Raises one :class:`WeightsError` that names EVERY missing file and where to put it, so a
    user offline learns all of them at once. Nothing is built here.
    """
    problems: list[str] = []
    needed = METHOD_MODELS[config.method]

    def attempt(load: Callable[[], T]) -> T | None:
        try:
            return load()
        except WeightsError as error:
            problems.append(str(error).replace(f'\n  {SMOKE_HINT}', ''))
            return None

    sam_path = attempt(lambda: resolve_sam_checkpoint(config)) if 'sam' in needed else None
    dino_path = None
    if 'dino' in needed:
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
    return WeightSources(models=needed, sam=sam_path, dino=dino_path, clip=clip_source)


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
                           dtype: torch.dtype) -> tuple[nn.Module, nn.Module | None, nn.Module | None, str]:
    """The paper's architectures with their weights, only those ``config.method`` needs; every file
    is found before anything is built."""
    from segment_anything import sam_model_registry

    sources = fetch_weights(config)
    sam = None
    if 'sam' in sources.models:
        sam = sam_model_registry[config.sam_model](checkpoint=None)
        load_into(sam, sources.sam, f'SAM {config.sam_model}')
    dino = _build_dino(config, sources.dino) if 'dino' in sources.models else None
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


OPEN_CLIP_PRECISION = {torch.float16: 'fp16', torch.bfloat16: 'bf16', torch.float32: 'fp32'}


def _build_clip(config: TridentConfig, clip_source: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import open_clip

    try:
        return open_clip.create_model(config.clip_model, pretrained=clip_source, force_quick_gelu=True,
                                      precision=OPEN_CLIP_PRECISION[dtype], device=device)
    except Exception as error:  # open_clip wraps download/load failures in RuntimeError and others
        raise clip_weights_error(config, error) from error
