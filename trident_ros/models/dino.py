"""DINO on an unmodified timm ``VisionTransformer``, and DINO's position-embedding rule.

:class:`DinoPatches` gives DINO's normed last-layer patch tokens; :func:`interpolate_pos_embed`
is the position-embedding resize of DINO's own code, which the reference also applies to CLIP.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def interpolate_pos_embed(patch_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a square grid of patch position embeddings the way DINO (and the reference's CLIP) do.

    ``interpolate(scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode='bicubic')`` of the ``n x n``
    grid; the scale factor, not the output size, sets the sampling positions, which is what makes
    this differ from an exact-size resize. Computed in float32.

    Args:
        patch_pos: (n*n, D) embeddings of the patch tokens (no class token).
        grid: (gh, gw) patch grid of the input.

    Returns:
        (gh*gw, D) in the dtype of ``patch_pos``; ``patch_pos`` itself when the grid is n x n.

    Raises:
        ValueError: ``patch_pos`` is not a square grid, or the resize missed ``grid``.
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


def patch_grid(images: torch.Tensor, patch: int, what: str) -> tuple[int, int]:
    """The (gh, gw) patch grid of crops (B, 3, h, w) whose sides are multiples of ``patch``.

    Raises:
        ValueError: not (B, 3, h, w), or a side is not a multiple of ``patch`` (``what`` names the caller).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f'{what}: expected crops (B, 3, h, w), got {tuple(images.shape)}')
    h, w = images.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f'{what}: crop size {h}x{w} is not a multiple of the patch size {patch}')
    return h // patch, w // patch


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

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(1 + gh*gw, C)`` position embedding of a ``(gh, gw)`` patch grid (class token first), DINO's rule."""
        pos = self.model.pos_embed[0]
        return torch.cat([pos[:1], interpolate_pos_embed(pos[1:], grid)], dim=0)

    def _embed(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 1 + gh*gw, C) tokens entering the first block (class token first)."""
        model = self.model
        grid = patch_grid(crops, self.patch_size, 'DinoPatches')
        x = model.patch_embed.proj(crops.to(self.dtype))
        x = model.patch_embed.norm(x.flatten(2).transpose(1, 2))
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = model.pos_drop(x + self.position_embedding(grid).to(x.dtype))
        return model.norm_pre(model.patch_drop(x))

    @torch.inference_mode()
    def patch_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Normed last-layer patch tokens of normalised crops.

        Args:
            crops: (B, 3, h, w) ImageNet-normalised, sides multiples of the patch size.

        Returns:
            (B, gh*gw, C) patch tokens (row-major grid).
        """
        model = self.model
        return model.norm(model.blocks(self._embed(crops)))[:, 1:]

    @torch.inference_mode()
    def last_query_plus_key(self, crops: torch.Tensor) -> torch.Tensor:
        """``q + k`` of the last block's attention for the patch tokens (CorrCLIP's DINO features).

        Every block but the last runs; the last block's ``qkv`` projection is applied to ``norm1`` of its input
        and its query and key halves (all heads concatenated, before any scaling) are added; the rest of the
        block does not run.

        Args:
            crops: (B, 3, h, w) ImageNet-normalised, sides multiples of the patch size.

        Returns:
            (B, gh*gw, C) (row-major grid, class token dropped).
        """
        blocks = self.model.blocks
        x = blocks[:-1](self._embed(crops))
        last = blocks[-1]
        qkv = last.attn.qkv(last.norm1(x))  # (B, T, 3C): q, k, v, each heads concatenated
        return qkv[:, 1:, :self.dim] + qkv[:, 1:, self.dim:2 * self.dim]
