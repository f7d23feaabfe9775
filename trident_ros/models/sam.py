"""SAM's image encoder on an unmodified segment-anything ``Sam``, with its last block's attention observable.

:class:`SamEncoder` runs SAM's image encoder, handing the attention of its last block, block by
block of query rows as the block computes it, to an :class:`AttentionObserver` (aggregation).
:class:`SamChunkedAttention` and :class:`SamChunkedMlp` stand in for each encoder block's
``attn`` and ``mlp`` (same weights, same result) so that the global blocks never hold their whole
``(heads, 4096, 4096)`` attention matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

SAM_ROUND = 16
"""The SAM branch sees the image with its sides rounded up to a multiple of this (as the reference)."""


class AttentionObserver(Protocol):
    """Receives the attention of a :class:`SamChunkedAttention` global block while it runs."""

    def start(self, v: torch.Tensor) -> None:
        """Called once, before any rows.

        Args:
            v: (heads, H, W, hd) the values of the whole grid.
        """

    def rows(self, rows: slice, attention: torch.Tensor) -> None:
        """Called per block of query rows, in order.

        Args:
            rows: the image rows of this block's queries.
            attention: (heads, len(rows) * W, H * W) the softmax attention of those queries over
                all keys (read only).
        """


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
        """The upstream ``Attention`` forward, a block of query rows at a time.

        Args:
            x: (B, H, W, C) tokens (B: windows of a window block, 1 for a global block).

        Returns:
            (B, H, W, C), as the upstream ``Attention``.

        Raises:
            ValueError: an observer is set on a window block (more than one image).
        """
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
        (but at least one image row of one image).
        """
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
        """The upstream ``MLPBlock`` forward, a block of tokens at a time: (..., C) -> (..., C_out)."""
        tokens = x.reshape(-1, x.shape[-1])
        out = x.new_empty(tokens.shape[0], self.lin2.out_features)
        step = max(1, self.max_elements // self.lin1.out_features)
        for start in range(0, tokens.shape[0], step):
            out[start:start + step] = self.lin2(self.act(self.lin1(tokens[start:start + step])))
        return out.view(*x.shape[:-1], -1)


def use_chunked_blocks(encoder: nn.Module, max_elements: int = SAM_BLOCK_ELEMENTS) -> None:
    """Put a :class:`SamChunkedAttention` and a :class:`SamChunkedMlp` in place of the ``attn`` and
    ``mlp`` of every block of a segment-anything ``ImageEncoderViT`` (global and window blocks;
    modules already converted are left alone).
    """
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

        Returns:
            The (h, w, 3) uint8 image before normalisation and padding, and the rounded size (H16, W16).

        Raises:
            ValueError: not an (H, W, 3) uint8 image.
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
        spans one SAM patch (the reference would crash there).
        """
        long_side = -(-max(height, width) // SAM_ROUND) * SAM_ROUND
        floor = -(-long_side * self.patch_size // self.transform.target_length)
        return -(-max(height, floor) // SAM_ROUND) * SAM_ROUND, -(-max(width, floor) // SAM_ROUND) * SAM_ROUND

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """``(hs, ws)``: the unpadded token grid of an ``H x W`` image (``input_size // 16``, as the
        reference), known before encoding.
        """
        rounded = self.rounded_size(height, width)
        input_h, input_w = self.transform.get_preprocess_shape(rounded[0], rounded[1], self.transform.target_length)
        return input_h // self.patch_size, input_w // self.patch_size

    def encoder_input(self, resized: np.ndarray) -> torch.Tensor:
        """``(1, 3, S, S)`` normalised and padded encoder input of an image :meth:`resize` gave."""
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.model.preprocess(pixels).to(self.dtype)

    @torch.inference_mode()
    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """The image encoder's input for an ``(H, W, 3)`` uint8 RGB image: ``(1, 3, S, S)``
        normalised and padded (S = 1024 at full scale), in the encoder's dtype and device.
        """
        return self.encoder_input(self.resize(image)[0])

    @torch.inference_mode()
    def encode(self, image: np.ndarray, observer: AttentionObserver | None = None) -> SamImage:
        """Run SAM's image encoder on one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            observer: receives the last block's values and attention rows during the encoding
                (:class:`AttentionObserver`; the grid is the padded one, :meth:`token_grid` its valid part).

        Returns:
            The :class:`SamImage` (embedding, sizes).
        """
        resized, rounded = self.resize(image)
        self.last_attn.observer = observer
        try:
            embedding = self.model.image_encoder(self.encoder_input(resized))
        finally:
            self.last_attn.observer = None
        return SamImage(embedding=embedding.float(), input_size=(resized.shape[0], resized.shape[1]),
                        original_size=(image.shape[0], image.shape[1]), rounded_size=rounded)

