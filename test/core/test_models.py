"""The encoder wrappers against the unmodified upstream modules, on tiny random configurations."""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, add_decomposed_rel_pos
from timm.layers import resample_abs_pos_embed
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trident_ros.config import TridentConfig
from trident_ros.models import (
    SAM_BLOCK_ELEMENTS,
    ClipDense,
    DinoPatches,
    SamChunkedAttention,
    SamChunkedMlp,
    SamEncoder,
    TridentModels,
    interpolate_pos_embed,
    load_models,
    use_chunked_blocks,
)

TINY = TridentConfig.from_mapping({'models.model_scale': 'tiny', 'models.random_weights': True, 'models.device': 'cpu'})


@pytest.fixture(scope='module')
def models() -> TridentModels:
    return load_models(TINY)


@pytest.fixture
def logged(log_records) -> list[logging.LogRecord]:
    return log_records('trident_ros.models')


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def dino_formula(pos: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` written out: ``pos (1, 1 + n*n, D)`` -> ``(1, 1 + rows*cols, D)``."""
    n = int(math.sqrt(pos.shape[1] - 1))
    grid = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / n, (cols + 0.1) / n), mode='bicubic')
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


def block_input(module: torch.nn.Module, run) -> torch.Tensor:
    """The (first) positional input of ``module`` during ``run()``."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


# --- load_models ------------------------------------------------------------------------------------

def test_tiny_models_types_modes_and_description(models):
    assert isinstance(models.clip, ClipDense) and isinstance(models.dino, DinoPatches)
    assert isinstance(models.sam, SamEncoder)
    assert models.device == torch.device('cpu') and models.dtype == torch.float32
    for module in (models.clip.model, models.dino.model, models.sam.model):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    # same architectures as the real ones: QuickGELU CLIP, real tokenizer, timm ViT, SAM with global last block
    assert type(models.clip.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == 'QuickGELU'
    assert models.clip.model.vocab_size == 49408 and models.tokenizer(['a cat']).shape == (1, 77)
    assert type(models.dino.model).__name__ == 'VisionTransformer'
    blocks = models.sam.model.image_encoder.blocks
    assert blocks[0].window_size > 0 and blocks[-1].window_size == 0
    text = models.describe()
    assert 'RANDOM' in text and 'cpu' in text and 'float32' in text


def test_random_weights_logs_a_loud_warning(logged):
    load_models(TINY)
    warnings = [r.getMessage() for r in logged if r.levelno >= logging.WARNING]
    assert any('RANDOM WEIGHTS' in m and 'MEANINGLESS' in m for m in warnings)


def test_load_models_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_models(TINY)
    assert torch.equal(torch.rand(3), expected_next)
    second = load_models(TINY)
    for a, b in ((first.clip.model, second.clip.model), (first.dino.model, second.dino.model),
                 (first.sam.model, second.sam.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- CLIP -------------------------------------------------------------------------------------------

def test_clip_values_at_native_size_match_the_upstream_forward(models):
    clip = models.clip
    crops = torch.randn(2, 3, 224, 224)
    before = clip.model.encode_image(crops)
    x = block_input(clip.visual.transformer.resblocks[-1], lambda: clip.model.encode_image(crops))  # (B, 1+N, D)
    values, grid = clip.last_block_values(crops)
    block = clip.last_block
    dim, heads = clip.width, clip.heads
    v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)[..., 2 * dim:]
    expected = v[:, 1:].reshape(2, 14 * 14, heads, dim // heads).permute(0, 2, 1, 3)
    assert grid == (14, 14) and values.shape == (2, heads, 196, dim // heads)
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(clip.model.encode_image(crops), before)  # the wrapper leaves CLIP untouched


def test_clip_values_at_336_use_the_reference_position_interpolation(models):
    clip = models.clip
    crops = torch.randn(1, 3, 336, 336)
    # upstream CLIP whose position embedding is replaced by DINO's formula at 21 x 21
    reference = copy.deepcopy(clip.model)
    pos = reference.visual.positional_embedding.detach()[None]
    reference.visual.positional_embedding = torch.nn.Parameter(dino_formula(pos, 21, 21)[0])
    x = block_input(reference.visual.transformer.resblocks[-1], lambda: reference.encode_image(crops))
    block = reference.visual.transformer.resblocks[-1]
    dim, heads = clip.width, clip.heads
    v = F.linear(block.ln_1(x[:, 1:]), block.attn.in_proj_weight, block.attn.in_proj_bias)[..., 2 * dim:]
    values, grid = clip.last_block_values(crops)
    assert grid == (21, 21)
    torch.testing.assert_close(values, v.reshape(1, 441, heads, dim // heads).permute(0, 2, 1, 3),
                               rtol=1e-5, atol=1e-6)


def test_clip_attention_output_and_projection_are_the_upstream_layers(models):
    clip = models.clip
    x = torch.randn(3, 5, clip.width)
    out = clip.attention_output(x)
    torch.testing.assert_close(out, x @ clip.last_block.attn.out_proj.weight.T + clip.last_block.attn.out_proj.bias)
    projected = clip.project(out)
    expected = F.layer_norm(out, (clip.width,), clip.visual.ln_post.weight, clip.visual.ln_post.bias,
                            clip.visual.ln_post.eps) @ clip.visual.proj
    assert projected.shape == (3, 5, clip.embed_dim)
    torch.testing.assert_close(projected, expected)
    # the pooled image embedding is ln_post + proj of the class token
    crops = torch.randn(1, 3, 224, 224)
    final = block_input(clip.visual.ln_post, lambda: clip.model.encode_image(crops))
    torch.testing.assert_close(clip.project(final[:, 0]), clip.model.encode_image(crops))


def test_crop_sides_must_be_patch_multiples(models):
    with pytest.raises(ValueError, match='multiple of the patch size'):
        models.clip.last_block_values(torch.randn(1, 3, 100, 112))
    with pytest.raises(ValueError, match='multiple of the patch size'):
        models.dino.patch_features(torch.randn(1, 3, 112, 100))


# --- DINO -------------------------------------------------------------------------------------------

def test_dino_features_at_224_equal_timm_forward_features(models):
    crops = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = models.dino.model.forward_features(crops)[:, 1:]
    features = models.dino.patch_features(crops)
    assert features.shape == (2, 196, models.dino.dim) and features.dtype == torch.float32
    assert torch.equal(features, expected)


def test_position_interpolation_is_dinos_rule_not_timms():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 24)
    ours = interpolate_pos_embed(pos[0, 1:], (21, 21))
    assert torch.equal(ours, dino_formula(pos, 21, 21)[0, 1:])
    timm_resized = resample_abs_pos_embed(pos, new_size=(21, 21), old_size=(14, 14), num_prefix_tokens=1)[0, 1:]
    assert (ours - timm_resized).abs().max() > 1e-2
    # non-square grids, and the identity at the native grid
    assert interpolate_pos_embed(pos[0, 1:], (14, 21)).shape == (14 * 21, 24)
    assert torch.equal(interpolate_pos_embed(pos[0, 1:], (14, 14)), pos[0, 1:])


def test_dino_features_at_336_use_dinos_interpolation(models):
    crops = torch.randn(1, 3, 336, 336)
    reference = copy.deepcopy(models.dino.model)
    reference.pos_embed = torch.nn.Parameter(dino_formula(reference.pos_embed.detach(), 21, 21))
    reference.patch_embed.strict_img_size = False
    with torch.no_grad():
        expected = reference.forward_features(crops)[:, 1:]
    features = models.dino.patch_features(crops)
    assert features.shape == (1, 441, models.dino.dim)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


# --- SAM --------------------------------------------------------------------------------------------

def test_sam_embedding_is_the_predictors_bit_for_bit(models):
    image = random_image(96, 128)  # sides already multiples of 16: no rounding resize
    encoded = models.sam.encode(image)
    predictor = SamPredictor(models.sam.model)
    with torch.no_grad():
        predictor.set_image(image)
    assert torch.equal(encoded.embedding, predictor.features)
    assert encoded.input_size == tuple(predictor.input_size) == (192, 256)
    assert encoded.original_size == encoded.rounded_size == (96, 128)


def test_sam_rounds_sides_to_multiples_of_16_first(models):
    import cv2

    image = random_image(100, 150, seed=1)
    encoded = models.sam.encode(image)
    assert encoded.original_size == (100, 150) and encoded.rounded_size == (112, 160)
    predictor = SamPredictor(models.sam.model)
    with torch.no_grad():
        predictor.set_image(cv2.resize(image, (160, 112)))
    assert torch.equal(encoded.embedding, predictor.features)
    # 112 x 160 -> longest side 256: 179 x 256; unpadded token grid 179 // 16 x 256 // 16
    assert encoded.input_size == (179, 256) and models.sam.token_grid(100, 150) == (11, 16)


def upstream_last_attention(sam: SamEncoder, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input, softmax attention and output of the last encoder block's ``attn``, recomputed in the test
    from the block's own weights and segment-anything's ``add_decomposed_rel_pos``.
    """
    attn = sam.model.image_encoder.blocks[-1].attn
    outputs: list[torch.Tensor] = []
    handle = attn.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
    try:
        x = block_input(attn, lambda: SamPredictor(sam.model).set_image(image))
    finally:
        handle.remove()
    _, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(1, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.reshape(3, attn.num_heads, h * w, -1).unbind(0)
    logits = add_decomposed_rel_pos((q * attn.scale) @ k.transpose(-2, -1), q, attn.rel_pos_h, attn.rel_pos_w,
                                    (h, w), (h, w))
    return x, logits.softmax(dim=-1), outputs[0]


class RecordingObserver:
    """An AttentionObserver keeping what it is given."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.blocks: list[tuple[slice, torch.Tensor]] = []

    def start(self, v: torch.Tensor) -> None:
        self.values.append(v.clone())

    def rows(self, rows: slice, attention: torch.Tensor) -> None:
        self.blocks.append((rows, attention.clone()))

    def attention(self) -> torch.Tensor:
        return torch.cat([attention for _, attention in self.blocks], dim=1)


def test_observer_gets_the_upstream_block_attention(models):
    image = random_image(96, 128, seed=2)
    _, expected, block_output = upstream_last_attention(models.sam, image)
    observer = RecordingObserver()
    models.sam.encode(image, observer=observer)
    assert models.sam.last_attn.observer is None  # only for that call
    (values,) = observer.values
    heads, g = values.shape[0], values.shape[1]
    assert values.shape == (heads, 16, 16, 16)
    blocks = [rows for rows, _ in observer.blocks]
    assert blocks[0].start == 0 and blocks[-1].stop == g
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:], strict=False))  # every row once, in order
    everything = observer.attention()
    assert everything.shape == (heads, g * g, g * g)
    torch.testing.assert_close(everything, expected, rtol=1e-5, atol=1e-6)
    # the observed v, with that attention, reproduces the block's own output
    attn = models.sam.model.image_encoder.blocks[-1].attn
    mixed = (everything @ values.reshape(heads, g * g, -1)).permute(1, 0, 2).reshape(1, g, g, -1)
    torch.testing.assert_close(attn.proj(mixed), block_output, rtol=1e-5, atol=1e-5)


def test_observer_removed_after_an_error_and_windows_refused(models):
    class Failing(RecordingObserver):
        def rows(self, rows: slice, attention: torch.Tensor) -> None:
            raise RuntimeError('observer failed')

    with pytest.raises(RuntimeError, match='observer failed'):
        models.sam.encode(random_image(64, 64, seed=3), observer=Failing())
    assert models.sam.last_attn.observer is None
    encoded = models.sam.encode(random_image(64, 64, seed=3))
    assert encoded.embedding.shape == (1, 32, 16, 16)
    window_attn = models.sam.model.image_encoder.blocks[0].attn
    window_attn.observer = RecordingObserver()
    try:
        with pytest.raises(ValueError, match='global block'):
            window_attn(torch.zeros(2, 4, 4, window_attn.qkv.in_features))
    finally:
        window_attn.observer = None


def test_sam_rejects_non_uint8_rgb(models):
    with pytest.raises(ValueError, match='uint8'):
        models.sam.encode(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match='uint8'):
        models.sam.encode(np.zeros((32, 32), dtype=np.uint8))


def test_prepare_gives_the_encoder_input_the_predictor_uses(models):
    image = random_image(96, 128, seed=4)
    prepared = models.sam.prepare(image)
    predictor_input = block_input(models.sam.model.image_encoder,
                                  lambda: SamPredictor(models.sam.model).set_image(image))
    assert prepared.shape == (1, 3, 256, 256) and prepared.dtype == models.sam.dtype
    assert torch.equal(prepared, predictor_input)


# --- SAM encoder blocks in chunks (attention: blocks of query rows; MLP: blocks of tokens) -------

def upstream_attention(dim: int, heads: int, size: tuple[int, int], use_rel_pos: bool = True,
                       seed: int = 0) -> Attention:
    """segment-anything's ``Attention`` with random weights, relative-position tables included."""
    torch.manual_seed(seed)
    attn = Attention(dim, num_heads=heads, use_rel_pos=use_rel_pos, rel_pos_zero_init=False, input_size=size).eval()
    if use_rel_pos:
        with torch.no_grad():
            attn.rel_pos_h.normal_(0, 0.5)
            attn.rel_pos_w.normal_(0, 0.5)
    return attn


class LargestOutputs(TorchDispatchMode):
    """Records, per last dimension, the most elements of any new tensor a torch op returned while
    active (views of its inputs not counted).
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.ndim and tensor.untyped_storage().data_ptr() not in inputs:
                last = tensor.shape[-1]
                self.largest[last] = max(self.largest.get(last, 0), tensor.numel())
        return out


@pytest.mark.parametrize('batch, size, max_elements', [
    (1, (10, 14), 1),                # global block, non-square: one image row per block
    (1, (10, 14), 2 * 3 * 14 * 140),  # three rows per block, the last block has one
    (1, (10, 14), 10 ** 9),           # everything at once
    (5, (6, 6), 2 * 2 * 36 * 36),     # window block: two windows per block, the last has one
])
def test_chunked_attention_equals_the_upstream_module(batch, size, max_elements):
    upstream = upstream_attention(32, 2, size)
    x = torch.randn(batch, *size, 32, generator=torch.Generator().manual_seed(1))
    chunked = SamChunkedAttention(upstream, max_elements)
    with torch.inference_mode():
        expected = upstream(x)
        out = chunked(x)
    assert out.shape == expected.shape == (batch, *size, 32)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # the blocks cover every (image, row) exactly once
    covered = sorted((b, y) for images, rows in chunked.blocks(batch, *size)
                     for b in range(images.start, images.stop) for y in range(rows.start, rows.stop))
    assert covered == [(b, y) for b in range(batch) for y in range(size[0])]


def test_chunked_attention_without_relative_positions():
    upstream = upstream_attention(32, 4, (8, 8), use_rel_pos=False)
    x = torch.randn(2, 8, 8, 32)
    with torch.inference_mode():
        torch.testing.assert_close(SamChunkedAttention(upstream, 1)(x), upstream(x), rtol=1e-6, atol=1e-6)


def test_chunked_attention_reuses_the_upstream_weights():
    upstream = upstream_attention(32, 2, (8, 8))
    chunked = SamChunkedAttention(upstream)
    assert list(chunked.state_dict()) == list(upstream.state_dict())
    for name, tensor in upstream.state_dict().items():
        assert chunked.state_dict()[name].data_ptr() == tensor.data_ptr(), name
    assert chunked.qkv is upstream.qkv and chunked.proj is upstream.proj
    with pytest.raises(ValueError, match='max_elements'):
        SamChunkedAttention(upstream, 0)


def test_chunked_attention_never_holds_the_whole_attention_matrix():
    """Upstream: (heads, N, N) logits (N = 16*16); blocks of one image row: (heads, 16, N) at most."""
    upstream = upstream_attention(32, 2, (16, 16))
    x = torch.randn(1, 16, 16, 32)
    count = 16 * 16
    with torch.inference_mode():
        with LargestOutputs() as whole:
            upstream(x)
        with LargestOutputs() as rows:
            SamChunkedAttention(upstream, 2 * 16 * count)(x)
    assert whole.largest[count] == 2 * count * count
    assert rows.largest[count] == 2 * 16 * count


def test_chunked_mlp_equals_the_upstream_module():
    torch.manual_seed(0)
    upstream = MLPBlock(32, 64).eval()
    x = torch.randn(2, 7, 5, 32)
    for max_elements in (1, 64 * 3, 10 ** 9):  # one token, three tokens (uneven last block), all at once
        chunked = SamChunkedMlp(upstream, max_elements)
        with torch.inference_mode():
            torch.testing.assert_close(chunked(x), upstream(x), rtol=1e-6, atol=1e-6)
    assert list(chunked.state_dict()) == list(upstream.state_dict())
    assert chunked.lin1 is upstream.lin1 and chunked.lin2 is upstream.lin2 and chunked.act is upstream.act
    with LargestOutputs() as whole, torch.inference_mode():
        upstream(x)
    with LargestOutputs() as blocks, torch.inference_mode():
        SamChunkedMlp(upstream, 64 * 3)(x)
    assert whole.largest[64] == 70 * 64 and blocks.largest[64] == 3 * 64


def test_encoder_with_chunked_blocks_equals_the_upstream_encoder():
    """A small ImageEncoderViT with window blocks (padded windows: 8 tokens in windows of 3) and two
    global blocks: the image embedding is the upstream encoder's.
    """
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0,
                              out_chans=16, use_rel_pos=True, rel_pos_zero_init=False, window_size=3,
                              global_attn_indexes=(1, 3)).eval()
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    chunked = copy.deepcopy(encoder)
    use_chunked_blocks(chunked, max_elements=1)
    assert all(isinstance(block.attn, SamChunkedAttention) and isinstance(block.mlp, SamChunkedMlp)
               for block in chunked.blocks)
    chunked.load_state_dict(encoder.state_dict())  # same parameter names
    image = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        torch.testing.assert_close(chunked(image), encoder(image), rtol=1e-5, atol=1e-6)
    use_chunked_blocks(chunked)  # modules already converted are left alone
    assert all(block.attn.max_elements == block.mlp.max_elements == 1 for block in chunked.blocks)


def test_sam_encoder_uses_chunked_blocks_unless_told_not_to():
    sam = load_models(TINY).sam
    blocks = sam.model.image_encoder.blocks
    assert all(isinstance(block.attn, SamChunkedAttention) and isinstance(block.mlp, SamChunkedMlp)
               for block in blocks)
    assert sam.last_attn is blocks[-1].attn
    with torch.no_grad():  # relative positions that matter (the tiny model's are near zero)
        for block in blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    plain = copy.deepcopy(sam.model)
    for block in plain.image_encoder.blocks:  # back to the upstream modules, same weights
        block.attn, block.mlp = upstream_attention_from(block.attn), upstream_mlp_from(block.mlp)
    upstream = SamEncoder(plain, chunked=False)
    # all upstream modules but the last block's attention, which hands its rows to the aggregation
    chunked = [module for module in plain.modules() if isinstance(module, (SamChunkedAttention, SamChunkedMlp))]
    assert chunked == [upstream.last_attn] and upstream.last_attn is plain.image_encoder.blocks[-1].attn
    image = random_image(96, 128, seed=5)
    expected, observed = RecordingObserver(), RecordingObserver()
    upstream_image, encoded = upstream.encode(image, observer=expected), sam.encode(image, observer=observed)
    torch.testing.assert_close(encoded.embedding, upstream_image.embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(observed.values[0], expected.values[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(observed.attention(), expected.attention(), rtol=1e-5, atol=1e-6)


def test_sam_encoder_block_size():
    sam = load_models(TINY).sam
    assert all(block.attn.max_elements == block.mlp.max_elements == SAM_BLOCK_ELEMENTS
               for block in sam.model.image_encoder.blocks)  # on the CPU
    model = copy.deepcopy(sam.model)
    for block in model.image_encoder.blocks:
        block.attn, block.mlp = upstream_attention_from(block.attn), upstream_mlp_from(block.mlp)
    small = SamEncoder(model, block_elements=7)
    assert all(block.attn.max_elements == block.mlp.max_elements == 7 for block in small.model.image_encoder.blocks)
    image = random_image(64, 80, seed=6)
    torch.testing.assert_close(small.encode(image).embedding, sam.encode(image).embedding, rtol=1e-5, atol=1e-6)


def upstream_attention_from(chunked: SamChunkedAttention) -> Attention:
    """An upstream ``Attention`` holding the weights of a :class:`SamChunkedAttention`."""
    dim = chunked.qkv.in_features
    size = ((chunked.rel_pos_h.shape[0] + 1) // 2, (chunked.rel_pos_w.shape[0] + 1) // 2)
    attn = Attention(dim, num_heads=chunked.num_heads, use_rel_pos=True, input_size=size)
    attn.load_state_dict(chunked.state_dict())
    return attn.eval()


def upstream_mlp_from(chunked: SamChunkedMlp) -> MLPBlock:
    """An upstream ``MLPBlock`` holding the weights of a :class:`SamChunkedMlp`."""
    mlp = MLPBlock(chunked.lin1.in_features, chunked.lin1.out_features, act=type(chunked.act))
    mlp.load_state_dict(chunked.state_dict())
    return mlp.eval()


def test_quick_gelu_follows_the_weights_openai_yes_laion_no():
    """OpenAI's CLIPs use QuickGELU; the headline ViT-H-14 LAION weights use plain GELU."""
    from trident_ros.models.build import clip_quick_gelu

    assert clip_quick_gelu(TridentConfig())  # ViT-B-16 openai
    local = TridentConfig.from_mapping({'models.clip_pretrained': '/weights/open_clip_model.safetensors'})
    assert clip_quick_gelu(local)  # OpenAI's arch
    laion = TridentConfig.from_mapping({'models.clip_model': 'ViT-H-14', 'models.clip_pretrained': 'laion2b_s32b_b79k'})
    assert not clip_quick_gelu(laion)
    assert not clip_quick_gelu(TridentConfig.from_mapping({'models.clip_model': 'ViT-H-14',
                                                       'models.clip_pretrained': '/weights/open_clip_model.bin'}))
