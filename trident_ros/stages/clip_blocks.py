"""CLIP's vision tower block by block: the residual stream after every block, and any block's heads.

The training-free methods that read CLIP's intermediate blocks (CLIPtrase, SC-CLIP, ResCLIP) name
blocks of OpenAI CLIP ViT-B/16, 1-based out of 12. :func:`paper_block` maps such an index onto a
tower of another depth (the small test configurations, ViT-L/H), proportionally.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch idiom)
from torch import nn

from trident_ros.models import ClipDense, ClipLastBlock

PAPER_DEPTH = 12
"""Blocks of the tower the methods' indices refer to (CLIP ViT-B/16)."""


def paper_block(depth: int, index: int) -> int:
    """Block ``index`` (1-based, of :data:`PAPER_DEPTH`) of a tower with ``depth`` blocks.

    Args:
        depth: blocks of the tower in use.
        index: 1-based block of a 12-block tower, at most 11 (the last block is rebuilt by every method).

    Returns:
        ``round(index * depth / 12)``, clamped to ``[1, depth - 1]``: ``index`` itself at depth 12.
    """
    return max(1, min(depth - 1, round(index * depth / PAPER_DEPTH)))


@dataclass
class BlockTrace:
    """The residual stream of a batch of crops through every block but the last.

    Attributes:
        stream: ``stream[l]`` (``l`` = 0..depth-1) is ``(B, T, D)``, the tokens after block ``l``
            (1-based; ``stream[0]``: after ``ln_pre``, entering block 1), class token first.
        last: the last block's input (``stream[depth - 1]``) and its query, key and value heads.
    """

    stream: list[torch.Tensor]
    last: ClipLastBlock

    def after(self, block: int) -> torch.Tensor:
        """``(B, T, D)`` tokens after 1-based ``block`` (0: before block 1)."""
        return self.stream[block]


@torch.inference_mode()
def trace_blocks(clip: ClipDense, crops: torch.Tensor) -> BlockTrace:
    """Run every block but the last on crops, keeping the residual stream after each block.

    The stream is captured with forward pre-hooks on the upstream blocks while
    :meth:`ClipDense.last_block_qkv` runs them, so the blocks run exactly as they do there.

    Args:
        clip: the CLIP wrapper.
        crops: ``(B, 3, h, w)`` CLIP-normalised, sides multiples of the patch size.

    Returns:
        The :class:`BlockTrace` (``len(stream) == depth``).
    """
    blocks = clip.visual.transformer.resblocks
    batch_first = getattr(clip.visual.transformer, 'batch_first', True)
    stream: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        stream.append(args[0] if batch_first else args[0].transpose(0, 1))

    hooks = [block.register_forward_pre_hook(keep) for block in blocks[:-1]]
    try:
        last = clip.last_block_qkv(crops)
    finally:
        for hook in hooks:
            hook.remove()
    stream.append(last.x)
    return BlockTrace(stream=stream, last=last)


def block_heads(block: nn.Module, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value heads of an upstream block's attention on ``ln_1(x)`` (no scaling).

    Args:
        block: an open_clip ``ResidualAttentionBlock``.
        x: ``(B, T, D)`` tokens entering the block.
        heads: attention heads.

    Returns:
        ``q, k, v``, each ``(B, heads, T, D / heads)``.
    """
    attn = block.attn
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    batch, tokens, width = qkv.shape
    return qkv.reshape(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def self_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale * x x^T)`` over the last axis: ``(..., T, hd) -> (..., T, T)`` float32."""
    x = x.float()
    return (x @ x.transpose(-2, -1) * scale).softmax(dim=-1)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """``(B, heads, T, hd) -> (B, T, heads * hd)``."""
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def unit_features(clip: ClipDense, tokens: torch.Tensor) -> torch.Tensor:
    """``ln_post``, the visual projection and L2 normalisation: ``(..., D) -> (..., E)`` float32."""
    return F.normalize(clip.project(tokens).float(), dim=-1)
