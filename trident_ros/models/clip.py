"""CLIP's vision tower on an unmodified open_clip ``CLIP`` (QuickGELU): the parts dense features need.

:class:`ClipDense` runs every block but the last and exposes the last block's pieces: its value
path (Trident, proxy, MaskCLIP), its query/key/value heads (the other CLIP-only rules), its
attention output projection, the rest of the block, and the final projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trident_ros.models.dino import interpolate_pos_embed, patch_grid

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipLastBlock:
    """What enters CLIP's last block for a batch of crops, and its attention inputs.

    Attributes:
        x: (B, 1 + gh*gw, D) tokens entering the block, class token first (the residual stream).
        q: (B, heads, 1 + gh*gw, D/heads) query heads of the block's in-projection of ``ln_1(x)``
            (no scaling applied); ``k`` and ``v`` likewise.
        k: keys, as ``q``.
        v: values, as ``q``.
        scale: ``(D/heads) ** -0.5``.
        grid: (gh, gw).
    """

    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    grid: tuple[int, int]


class ClipDense:
    """Dense CLIP features from an open_clip ``CLIP`` (QuickGELU) vision tower.

    Attributes:
        model: the upstream CLIP (its text tower is used for the vocabulary).
        heads: attention heads of the last block.
        width: D, the tower's width.
        embed_dim: E, the joint image-text embedding size.
        patch_size: pixels per patch.
        mean: CLIP normalisation mean (RGB).
        std: CLIP normalisation standard deviation (RGB).
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

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(1 + gh*gw, D)`` position embedding of a ``(gh, gw)`` grid (class token first), DINO's resize rule."""
        pos = self.visual.positional_embedding
        return torch.cat([pos[:1], interpolate_pos_embed(pos[1:], grid)], dim=0)

    @torch.inference_mode()
    def embed(self, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 1 + gh*gw, D) tokens entering the first block (after ``ln_pre``, class token first, batch first),
        and (gh, gw); the position embedding is interpolated to the crop.
        """
        visual = self.visual
        grid = patch_grid(crops, self.patch_size, 'ClipDense')
        x = visual.conv1(crops.to(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embedding(grid).to(x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x), grid

    def _tokens_before_last_block(self, crops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 1 + gh*gw, D) tokens (class token first) entering the last block, and (gh, gw)."""
        visual = self.visual
        x, grid = self.embed(crops)
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

        Args:
            crops: (B, 3, h, w), CLIP-normalised, ``h`` and ``w`` multiples of the patch size.

        Returns:
            values (B, heads, gh*gw, D/heads) and the grid (gh, gw).
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

        Args:
            crops: (B, 3, h, w), CLIP-normalised, ``h`` and ``w`` multiples of the patch size.

        Returns:
            :class:`ClipLastBlock` (token 0 is the class token).
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

        Args:
            x: (..., D) the block's input.
            attended: (..., D) attention output (after ``out_proj``).

        Returns:
            (..., D).
        """
        block = self.last_block
        h = x + block.ls_1(attended.to(x.dtype))
        return h + block.ls_2(block.mlp(block.ln_2(h)))

    @torch.inference_mode()
    def attention_output(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention output projection: (..., D) -> (..., D)."""
        return self.last_block.attn.out_proj(x.to(self.dtype))

    @torch.inference_mode()
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_post`` and the visual projection: (..., D) -> (..., E)."""
        return self.visual.ln_post(x.to(self.dtype)) @ self.visual.proj
