"""A 12-block CLIP with random weights, and its residual stream from open_clip's own forward.

The block indices of CLIPtrase, SC-CLIP and ResCLIP are those of ViT-B/16 (12 blocks); the stream
captured from the upstream forward restates the methods' formulas independently of the library code.
"""
from __future__ import annotations

import math

import torch

from trident_ros.models import ClipDense


def deep_tiny_clip(seed: int = 0) -> ClipDense:
    """open_clip ``CLIP`` with 12 vision blocks of width 64 (2 heads), QuickGELU, in eval mode."""
    from open_clip import CLIP, CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(embed_dim=32,
                     vision_cfg=CLIPVisionCfg(layers=12, width=64, head_width=32, patch_size=16, image_size=224),
                     text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
                     quick_gelu=True)
    return ClipDense(model.eval().requires_grad_(False))


def upstream_stream(clip: ClipDense, crops: torch.Tensor) -> list[torch.Tensor]:
    """``[x_0, x_1, ..., x_11]``: (B, T, D) tokens entering block 1 and after blocks 1..11.

    From forward hooks on open_clip's own forward (native crop size only).
    """
    blocks = clip.visual.transformer.resblocks
    batch_first = getattr(clip.visual.transformer, 'batch_first', True)
    captured: list[torch.Tensor] = []
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: captured.append(args[0]))]
    hooks += [block.register_forward_hook(lambda m, args, out: captured.append(out)) for block in blocks[:-1]]
    try:
        with torch.inference_mode():
            clip.visual(crops)
    finally:
        for hook in hooks:
            hook.remove()
    return [x if batch_first else x.transpose(0, 1) for x in captured]


def heads_of(block: torch.nn.Module, x: torch.Tensor, heads: int) -> list[tuple[torch.Tensor, ...]]:
    """Per head ``(q, k, v)`` (T, hd) float64 of one crop ``x`` (T, D), by slicing the in-projection."""
    dim = x.shape[-1]
    qkv = torch.nn.functional.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).double()
    q, k, v = qkv.split(dim, dim=-1)
    hd = dim // heads
    return [(q[:, h * hd:(h + 1) * hd], k[:, h * hd:(h + 1) * hd], v[:, h * hd:(h + 1) * hd]) for h in range(heads)]


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    exps = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return exps / exps.sum(dim=-1, keepdim=True)


def gaussian_prior(side: int, std: float = 5.0) -> torch.Tensor:
    """NACLIP's prior over 1 + side*side tokens, element by element (class token row/column 0)."""
    count = side * side + 1
    prior = torch.zeros(count, count, dtype=torch.float64)
    for i in range(1, count):
        for j in range(1, count):
            (ri, ci), (rj, cj) = divmod(i - 1, side), divmod(j - 1, side)
            prior[i, j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * std * std))
    return prior
