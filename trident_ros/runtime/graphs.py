"""The per-frame encoder graphs a method exports: torch modules built on the loaded models, run by the exporter.

Each graph is an ``nn.Module`` whose forward is the pipeline's own torch code on plain tensors (position
embeddings baked for one crop size, normalisation inside), so the exported graph computes what the torch path does:

==================  =========================================================  =====================================
graph kind          inputs                                                     outputs
==================  =========================================================  =====================================
``dino_patches``    crops (N, 3, c, c) in [0, 1]                               unit DINO patch features (N, Nd, C);
                                                                               per-crop sum of their cosines (N,)
``clip_guided``     crops (N, 3, c, c); unit DINO features (N, Nd, C);         attended tokens (N, Nd, D) after
                    offset (N,) = beta * mean(S); gamma (1,)                   ``out_proj``
``sam_fused``       image (1, 3, S, S) normalised, padded; features (D, G, G)  embedding (1, C, G, G); dense
                    resized to the valid grid, zero-padded; key mask (G*G,);   (E, G, G): aggregated, ``ln_post``,
                    cos_fac (1,); refine_neg_cos (1,)                          projection, L2-normalised
``sam_decoder``     embedding (1, C, G, G); points (R, 3, 2) in SAM's input    low-res mask logits (R, 1, M, M);
                    frame (peak point, box corners); dense prompts (R, C, G, G) predicted IoU (R, 1)
``clip_rule_<m>``   crops (N, 3, c, c) in [0, 1]                               unit patch features (N, gh*gw, E)
==================  =========================================================  =====================================

N (crops) and R (regions) are dynamic axes; the rest is static for the exported crop size (S is SAM's input, one
graph serving every aspect ratio through the key mask). open_clip's attention fast path
(``aten::_native_multi_head_attention``) does not export: :func:`export_mode` turns it off; timm's attention exports
as it is.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from trident_ros.models import ClipDense, DinoPatches, SamChunkedAttention, SamChunkedMlp, SamEncoder
from trident_ros.stages.clip_attention import RULES, clip_only_features
from trident_ros.stages.sam_aggregation import masked_aggregation
from trident_ros.stages.windows import guided_attention, normalise

OPSET = 17
"""ONNX opset of every graph: ``LayerNormalization`` exists, the TorchScript exporter of torch 2.3 to 2.14 writes
it, and the TensorRT 8.6 parser of JetPack 6.0 reads it."""


@dataclass(frozen=True)
class GraphSpec:
    """How one graph is exported: its input and output names, and the dynamic axis of each name that has one."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, str]


SPECS: dict[str, GraphSpec] = {
    'dino_patches': GraphSpec(('crops',), ('features', 'similarity_sum'),
                              {'crops': 'N', 'features': 'N', 'similarity_sum': 'N'}),
    'clip_guided': GraphSpec(('crops', 'dino', 'offset', 'gamma'), ('tokens',),
                             {'crops': 'N', 'dino': 'N', 'offset': 'N', 'tokens': 'N'}),
    'sam_fused': GraphSpec(('image', 'features', 'key_mask', 'cos_fac', 'refine_neg_cos'), ('embedding', 'dense'),
                           {}),
    'sam_decoder': GraphSpec(('embedding', 'points', 'dense_prompt'), ('low_res_masks', 'iou'),
                             {'points': 'R', 'dense_prompt': 'R', 'low_res_masks': 'R', 'iou': 'R'}),
    'clip_rule': GraphSpec(('crops',), ('features',), {'crops': 'N', 'features': 'N'}),
}
"""Per graph kind (``clip_rule`` for every ``clip_rule_<method>``)."""


def spec(kind: str) -> GraphSpec:
    """The :class:`GraphSpec` of a graph kind (``clip_rule_sclip`` -> ``clip_rule``)."""
    return SPECS['clip_rule' if kind.startswith('clip_rule_') else kind]


@contextlib.contextmanager
def export_mode() -> Iterator[None]:
    """open_clip's ``nn.MultiheadAttention`` fast path off (it does not export), restored afterwards."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


class _BakedClip(ClipDense):
    """A :class:`ClipDense` on the same model whose position embedding is a constant for one grid."""

    def __init__(self, clip: ClipDense, grid: tuple[int, int]) -> None:
        super().__init__(clip.model)
        self.baked = clip.position_embedding(grid).detach().clone()

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        return self.baked


class _BakedDino(DinoPatches):
    """A :class:`DinoPatches` on the same model whose position embedding is a constant for one grid."""

    def __init__(self, dino: DinoPatches, grid: tuple[int, int]) -> None:
        super().__init__(dino.model)
        self.baked = dino.position_embedding(grid).detach().clone()

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        return self.baked


class DinoPatchesGraph(nn.Module):
    """``dino_patches``: ImageNet normalisation, DINO's patch features, unit length; their cosine sums."""

    def __init__(self, dino: DinoPatches, crop: int) -> None:
        super().__init__()
        self.model = dino.model
        self.dino = _BakedDino(dino, (crop // dino.patch_size,) * 2)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, c, c) in [0, 1] -> unit features (N, Nd, C), per-crop sum of the (Nd, Nd) cosine matrix (N,)."""
        dino = self.dino
        unit = F.normalize(dino.patch_features(normalise(crops, dino.mean, dino.std, dino.dtype)).float(), dim=-1)
        return unit, (unit @ unit.transpose(1, 2)).sum(dim=(1, 2))


class ClipGuidedGraph(nn.Module):
    """``clip_guided``: CLIP's last-block values on the crops, attended with DINO's similarity, ``out_proj``."""

    def __init__(self, clip: ClipDense, crop: int, dino_patch: int) -> None:
        super().__init__()
        self.model = clip.model
        self.clip = _BakedClip(clip, (crop // clip.patch_size,) * 2)
        self.dino_grid = (crop // dino_patch,) * 2

    def forward(self, crops: torch.Tensor, dino: torch.Tensor, offset: torch.Tensor,
                gamma: torch.Tensor) -> torch.Tensor:
        """Crops (N, 3, c, c) in [0, 1], unit DINO features (N, Nd, C), offset (N,), gamma (1,) -> (N, Nd, D)."""
        clip = self.clip
        values, clip_grid = clip.last_block_values(normalise(crops, clip.mean, clip.std, clip.dtype))
        similarity = dino @ dino.transpose(1, 2)
        attended = guided_attention(similarity, values, clip_grid, self.dino_grid, offset[:, None, None], gamma)
        return clip.attention_output(attended).float()


class ClipRuleGraph(nn.Module):
    """``clip_rule_<method>``: a CLIP-only method's last-block rule on crops."""

    def __init__(self, clip: ClipDense, crop: int, method: str) -> None:
        super().__init__()
        if method not in RULES:
            raise ValueError(f'{method!r} has no CLIP-only rule ({", ".join(RULES)})')
        self.model = clip.model
        self.clip = _BakedClip(clip, (crop // clip.patch_size,) * 2)
        self.method = method

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, c, c) in [0, 1] -> (N, gh*gw, E) unit patch features."""
        clip = self.clip
        return clip_only_features(clip, normalise(crops, clip.mean, clip.std, clip.dtype), self.method)[0]


@contextlib.contextmanager
def upstream_blocks(encoder: nn.Module) -> Iterator[None]:
    """segment-anything's own ``Attention`` and ``MLPBlock`` (same parameter objects) in place of the chunked
    stand-ins of every encoder block, while it lasts: their per-chunk loops would unroll in a traced graph.
    """
    from segment_anything.modeling.common import MLPBlock
    from segment_anything.modeling.image_encoder import Attention

    saved = [(block.attn, block.mlp) for block in encoder.blocks]
    try:
        for block in encoder.blocks:
            attn, mlp = block.attn, block.mlp
            if isinstance(attn, SamChunkedAttention):
                dim = attn.qkv.in_features
                size = (attn.rel_pos_h.shape[0] + 1) // 2 if attn.use_rel_pos else None
                upstream = Attention(dim, attn.num_heads, qkv_bias=attn.qkv.bias is not None,
                                     use_rel_pos=attn.use_rel_pos, input_size=(size, size) if size else None)
                upstream.qkv, upstream.proj = attn.qkv, attn.proj
                if attn.use_rel_pos:
                    upstream.rel_pos_h, upstream.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
                block.attn = upstream
            if isinstance(mlp, SamChunkedMlp):
                upstream_mlp = MLPBlock(mlp.lin1.in_features, mlp.lin1.out_features)
                upstream_mlp.lin1, upstream_mlp.lin2, upstream_mlp.act = mlp.lin1, mlp.lin2, mlp.act
                block.mlp = upstream_mlp
        yield
    finally:
        for block, (attn, mlp) in zip(encoder.blocks, saved, strict=True):
            block.attn, block.mlp = attn, mlp


class SamFusedGraph(nn.Module):
    """``sam_fused``: SAM's image encoder with its last block written out, the Trident aggregation of its softmax
    attention, and CLIP's ``ln_post``/projection. Export it inside :func:`upstream_blocks`.
    """

    def __init__(self, sam: SamEncoder, clip: ClipDense) -> None:
        super().__init__()
        self.encoder = sam.model.image_encoder
        self.clip_model = clip.model
        self.clip = clip

    def forward(self, image: torch.Tensor, features: torch.Tensor, key_mask: torch.Tensor, cos_fac: torch.Tensor,
                refine_neg_cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See the module docstring: -> embedding (1, C, G, G), dense (E, G, G)."""
        from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

        encoder = self.encoder
        x = encoder.patch_embed(image.to(encoder.patch_embed.proj.weight.dtype))
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks[:-1]:
            x = block(x)
        last = encoder.blocks[-1]
        attn = last.attn
        _, height, width, channels = x.shape
        heads, count = attn.num_heads, height * width
        qkv = attn.qkv(last.norm1(x)).reshape(1, count, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, heads, count, -1).unbind(0)  # (heads, N, hd)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        logits = add_decomposed_rel_pos(logits, q, attn.rel_pos_h, attn.rel_pos_w, (height, width), (height, width))
        attention = logits.softmax(dim=-1)  # (heads, N, N)
        out = (attention @ v).view(1, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(1, height, width, -1)
        x = x + attn.proj(out)
        x = x + last.mlp(last.norm2(x))
        embedding = encoder.neck(x.permute(0, 3, 1, 2))
        aggregated = masked_aggregation(attention.float(), v.float(), features.reshape(features.shape[0], count),
                                        key_mask, cos_fac, refine_neg_cos)  # (D, N)
        dense = F.normalize(self.clip.project(aggregated.t()).float(), dim=-1)  # (N, E)
        return embedding.float(), dense.t().reshape(-1, height, width)


class SamDecoderGraph(nn.Module):
    """``sam_decoder``: SAM's prompt encoder on one point (label 1) and one box per region, and its mask decoder
    with single-mask output; the dense (mask) prompts come in computed (the pipeline's own vmapped mask encoder).
    """

    def __init__(self, sam: SamEncoder) -> None:
        super().__init__()
        self.prompt_encoder = sam.model.prompt_encoder
        self.mask_decoder = sam.model.mask_decoder

    def forward(self, embedding: torch.Tensor, points: torch.Tensor,
                dense_prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding (1, C, G, G), points (R, 3, 2), dense prompts (R, C, G, G) -> masks (R, 1, M, M), IoU (R, 1)."""
        prompts = self.prompt_encoder
        # upstream _embed_points (a label-1 point, no padding point) and _embed_boxes (corners: labels 2 and 3)
        sparse = prompts.pe_layer.forward_with_coords(points + 0.5, prompts.input_image_size)
        labels = torch.stack([prompts.point_embeddings[index].weight[0] for index in (1, 2, 3)])  # (3, C)
        masks, iou = self.mask_decoder(image_embeddings=embedding, image_pe=prompts.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse + labels, dense_prompt_embeddings=dense_prompt,
                                       multimask_output=False)
        return masks, iou


def build_graph(kind: str, models: object, crop: int) -> nn.Module:
    """The module of graph ``kind`` on loaded models (a :class:`~trident_ros.models.TridentModels`).

    Args:
        kind: a key of :data:`SPECS` or ``clip_rule_<method>``.
        models: the loaded models.
        crop: the window crop in pixels (the DINO/CLIP graphs bake its position embeddings).

    Raises:
        ValueError: an unknown kind.
    """
    if kind == 'dino_patches':
        return DinoPatchesGraph(models.dino, crop)
    if kind == 'clip_guided':
        return ClipGuidedGraph(models.clip, crop, models.dino.patch_size)
    if kind == 'sam_fused':
        return SamFusedGraph(models.sam, models.clip)
    if kind == 'sam_decoder':
        return SamDecoderGraph(models.sam)
    if kind.startswith('clip_rule_'):
        return ClipRuleGraph(models.clip, crop, kind.removeprefix('clip_rule_'))
    raise ValueError(f'unknown graph kind {kind!r}')


def example_inputs(kind: str, models: object, crop: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of graph ``kind`` for tracing (and the exported graph's check): ``batch`` crops or regions.

    Args:
        kind: the graph kind.
        models: the loaded models.
        crop: the window crop in pixels.
        batch: N or R of the dynamic axis.

    Returns:
        Random inputs of the right shapes and dtypes on the models' device (fixed seed).
    """
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(models.device)

    crops = rand(batch, 3, crop, crop)
    if kind == 'dino_patches' or kind.startswith('clip_rule_'):
        return (crops,)
    if kind == 'clip_guided':
        tokens = (crop // models.dino.patch_size) ** 2
        dino = F.normalize(rand(batch, tokens, models.dino.dim) - 0.5, dim=-1)
        return crops, dino, rand(batch) * 0.5, torch.full((1,), 3.0, device=models.device)
    sam = models.sam.model
    size = sam.image_encoder.img_size
    grid = sam.prompt_encoder.image_embedding_size
    channels = sam.prompt_encoder.embed_dim
    if kind == 'sam_fused':
        key_mask = torch.zeros(grid, device=models.device)
        key_mask[:, :grid[1] * 3 // 4] = 1
        return (rand(1, 3, size, size) * 4 - 2, rand(models.clip.width, *grid) * key_mask,
                key_mask.reshape(-1), torch.full((1,), 1.2, device=models.device), torch.ones(1, device=models.device))
    if kind == 'sam_decoder':
        corner = rand(batch, 1, 2) * size / 2
        points = torch.cat([corner + size / 8, corner, corner + size / 4], dim=1)
        return rand(1, channels, *grid) - 0.5, points, rand(batch, channels, *grid) - 0.5
    raise ValueError(f'unknown graph kind {kind!r}')
