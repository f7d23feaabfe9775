"""ResCLIP on NACLIP (methods ``resclip`` and ``resclip_rcs``).

Residual cross-correlation self-attention (RCS) and semantic feedback refinement (SFR).

Stage by stage after its authors' code (yvhangyang/ResCLIP 0e085f7, ``clip/model.py``), per crop:

1. Blocks 1-11 run unchanged; ``A_rcs`` = mean over blocks 6-9 of their per-head attention
   ``softmax(s q k^T)`` (VisionTransformer.forward, use_rcs): :func:`rcs_attention`.
2. The last block is NACLIP's (``softmax(s k k^T + G)``, no residual, no feed-forward), mixed:
   ``Mix(P) = 2 [(1 - l_r) P + l_r A_rcs]`` (custom_attn, ``resclip``): :func:`mix`. First pass:
   ``F1 = vis(out_proj(Mix(softmax(s k k^T + G)) v))`` (create_logit_temp). ``resclip_rcs`` stops here.
3. SFR (vocabulary side): ``F1``'s cosine logits upsampled to the crop's pixels, PAMR, softmax at
   scale 40; each pixel's class, unsure (-1) below ``temp_thd``; the mode per patch
   (create_patch_matrix): :func:`patch_labels`; the matrix ``M`` of same-label patch pairs,
   decayed along paths that leave the label, blurred along rows (generate_attention_sfr, check_path):
   :func:`sfr_matrix`.
4. Second pass: ``Mix(softmax(t_s [(1 - l_s) s k k^T + l_s M / max M] + G))`` (custom_attn with attn_sfr).

What the second pass needs is cached per window at the image side (:class:`ResclipWindows`), so
a vocabulary change reruns only steps 3-4: logits, PAMR on the crops, ``M``, one attention.
Differences from the reference: labels are classes (the max over a class's names), not names,
and an unsure patch (-1) is not confused with the first name (upstream: 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the PyTorch idiom)

from trident_ros.methods.base import Frame, Labelling, MethodFeatures, ParamError, setting
from trident_ros.methods.clip_rules import WINDOWS_336, Box, ClipWindowMethod
from trident_ros.models import ClipDense
from trident_ros.stages.clip_attention import NACLIP_GAUSSIAN_STD, neighbourhood_prior
from trident_ros.stages.clip_blocks import block_heads, merge_heads, paper_block, trace_blocks, unit_features
from trident_ros.stages.pamr import pamr_affinity, pamr_refine
from trident_ros.stages.splice import splice_unit_features
from trident_ros.vocabulary import Vocabulary

RCS_BLOCKS = range(6, 10)
"""Blocks 6..9 (of 12) whose attention is averaged into ``A_rcs``."""
RCS_TAU = 2.0
SFR_LOGIT_SCALE = 40.0
SFR_BLUR_STD = 5.0


@dataclass(frozen=True)
class ResclipParams:
    """Section ``resclip`` (methods resclip and resclip_rcs): ResCLIP's weights; defaults: its ADE20K setting."""

    rcs_lambda: float = setting(0.3, 'weight of the cross-correlation of blocks 6-9 in the last block (l_r)')
    sfr_tau: float = setting(2.1, 'resclip: SFR temperature (t_s)')
    sfr_lambda: float = setting(0.7, 'resclip: SFR weight (l_s)')
    temp_thd: float = setting(0.25, 'resclip: first-pass pixels less probable than this are unsure in SFR')

    def validate(self) -> None:
        """Raise :class:`~trident_ros.methods.base.ParamError` for the first invalid field."""
        if not self.sfr_tau > 0:
            raise ParamError('sfr_tau', 'must be > 0')
        for name in ('rcs_lambda', 'sfr_lambda', 'temp_thd'):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ParamError(name, 'must be in [0, 1]')


def rcs_attention(qk: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """Mean of per-head ``softmax(s q k^T)`` over blocks.

    Args:
        qk: per block ``(q, k)``, each ``(B, heads, T, hd)``.
        scale: ``hd ** -0.5``.

    Returns:
        ``(B, heads, T, T)`` float32.
    """
    return torch.stack([(q.float() @ k.float().transpose(-2, -1) * scale).softmax(-1) for q, k in qk]).mean(0)


def mix(weights: torch.Tensor, rcs: torch.Tensor, rcs_lambda: float) -> torch.Tensor:
    """``2 [(1 - l_r) P + l_r A_rcs]``."""
    return RCS_TAU * ((1 - rcs_lambda) * weights + rcs_lambda * rcs)


def patch_labels(probs: torch.Tensor, temp_thd: float, patch: int) -> torch.Tensor:
    """The most frequent pixel class per patch (ties: the smallest), ``-1`` where unsure.

    Args:
        probs: ``(K, h, w)`` class probabilities of one crop (``h``, ``w`` multiples of ``patch``).
        temp_thd: pixels whose best probability is lower are unsure (``-1``).
        patch: pixels per patch side.

    Returns:
        ``(h / patch, w / patch)`` int64.
    """
    best, label = probs.max(dim=0)
    label = label.masked_fill(best < temp_thd, -1)
    height, width = label.shape
    tiles = label.reshape(height // patch, patch, width // patch, patch).permute(0, 2, 1, 3)
    return tiles.reshape(height // patch, width // patch, -1).mode(dim=-1).values


def path_stays(labels: torch.Tensor) -> torch.Tensor:
    """Whether the straight path from patch ``i`` to patch ``j`` keeps ``i``'s label (ResCLIP's check_path).

    The segment is sampled at ``max d + 1`` evenly spaced points (``d``: Chebyshev distance, its
    maximum over all pairs), rounded to patches, and only the first ``d_ij + 1`` samples are tested
    (the reference's rule).

    Args:
        labels: ``(gh, gw)`` patch labels.

    Returns:
        ``(N, N)`` bool.
    """
    gh, gw = labels.shape
    index = torch.arange(gh * gw, device=labels.device)
    coords = torch.stack((index // gw, index % gw), dim=-1)  # (N, 2) (row, column)
    start = coords[:, None, :].expand(-1, gh * gw, -1).reshape(-1, 2)
    end = coords[None, :, :].expand(gh * gw, -1, -1).reshape(-1, 2)
    steps = (end - start).abs().amax(dim=1)
    most = int(steps.max())
    t = torch.linspace(0, 1, most + 1, device=labels.device)[None, :, None]
    points = (start[:, None] * (1 - t) + end[:, None] * t).round().long()  # (N*N, most+1, 2)
    tested = torch.arange(most + 1, device=labels.device)[None] <= steps[:, None]
    same = labels[points[..., 0], points[..., 1]] == labels[start[:, 0], start[:, 1]][:, None]
    return (same | ~tested).all(dim=1).reshape(gh * gw, gh * gw)


def sfr_matrix(labels: torch.Tensor, blur_std: float = SFR_BLUR_STD) -> torch.Tensor:
    """ResCLIP's semantic feedback matrix over ``1 + N`` tokens (class token first).

    ``M_ij = 1`` where patches ``i``, ``j`` share a label (and ``i == j``); pairs whose path leaves
    the label (:func:`path_stays`) are scaled by ``exp(-d_ij / max d)``; each row is convolved with
    a normalised Gaussian of ``min(N, int(6 std + 1))`` taps (made odd) along the patch index (zero
    padded), ReLU, divided by its sum (+1e-8); the class token's row and column are 0.

    Args:
        labels: ``(gh, gw)`` patch labels (:func:`patch_labels`).
        blur_std: the Gaussian's standard deviation, in patches.

    Returns:
        ``(1 + N, 1 + N)`` float32.
    """
    gh, gw = labels.shape
    count = gh * gw
    flat = labels.reshape(-1)
    matrix = (flat[:, None] == flat[None, :]).float()
    matrix.fill_diagonal_(1)
    index = torch.arange(count, device=labels.device)
    rows, cols = index // gw, index % gw
    steps = torch.maximum((rows[:, None] - rows[None]).abs(), (cols[:, None] - cols[None]).abs()).float()
    decay = torch.exp(-steps / steps.max().clamp(min=1))
    matrix = torch.where(path_stays(labels), matrix, matrix * decay)
    taps = min(count, int(6 * blur_std + 1))
    taps += 1 - taps % 2
    x = torch.arange(taps, device=labels.device, dtype=torch.float32) - taps // 2
    kernel = torch.exp(-x ** 2 / (2 * blur_std ** 2))
    blurred = F.conv1d(matrix[:, None], (kernel / kernel.sum()).view(1, 1, -1), padding=taps // 2)[:, 0].relu()
    return F.pad(blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8), (1, 0, 1, 0))


@dataclass
class ResclipWindows:
    """What ResCLIP's second pass needs, per window (B windows, T = 1 + gh*gw tokens).

    Attributes:
        k: ``(B, heads, T, hd)`` last-block keys.
        v: ``(B, heads, T, hd)`` last-block values.
        rcs: ``(B, heads, T, T)`` ``A_rcs``.
        first: ``(B, gh*gw, E)`` first-pass unit features.
        affinity: ``(B, 16, h, w)`` PAMR weights of each crop (None for ``resclip_rcs``).
        grid: ``(gh, gw)``; scale: ``hd ** -0.5``.
    """

    k: torch.Tensor
    v: torch.Tensor
    rcs: torch.Tensor
    first: torch.Tensor
    affinity: torch.Tensor | None
    grid: tuple[int, int]
    scale: float


def _output(clip: ClipDense, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unit patch features ``vis(out_proj(A v))``, class token dropped: ``(B, N, E)``."""
    return unit_features(clip, clip.attention_output(merge_heads(weights.to(v.dtype) @ v))[:, 1:])


@torch.inference_mode()
def resclip_first_pass(clip: ClipDense, crops: torch.Tensor, params: ResclipParams, with_sfr: bool,
                       pixels: torch.Tensor | None = None) -> ResclipWindows:
    """The image side: blocks 1-11, ``A_rcs`` and the first pass.

    Args:
        clip: the CLIP wrapper.
        crops: ``(B, 3, h, w)`` CLIP-normalised, sides multiples of the patch size.
        params: ResCLIP's weights.
        with_sfr: also keep what SFR needs (the crops' PAMR weights).
        pixels: ``(B, 3, h, w)`` the crops for PAMR (needed with ``with_sfr``).

    Returns:
        :class:`ResclipWindows`.
    """
    trace = trace_blocks(clip, crops)
    blocks = clip.visual.transformer.resblocks
    depth = len(blocks)
    chosen = sorted({paper_block(depth, block) for block in RCS_BLOCKS})
    qk = [block_heads(blocks[b - 1], trace.after(b - 1), clip.heads)[:2] for b in chosen]
    last = trace.last
    rcs = rcs_attention(qk, last.scale)
    prior = neighbourhood_prior(last.grid, NACLIP_GAUSSIAN_STD, last.k.device)
    k = last.k.float()
    weights = mix((k @ k.transpose(-2, -1) * last.scale + prior).softmax(-1), rcs, params.rcs_lambda)
    affinity = pamr_affinity(pixels) if with_sfr else None
    return ResclipWindows(k=last.k, v=last.v, rcs=rcs, first=_output(clip, weights, last.v), affinity=affinity,
                          grid=last.grid, scale=last.scale)


def crop_class_probabilities(features: torch.Tensor, grid: tuple[int, int], vocabulary: Vocabulary,
                             affinity: torch.Tensor) -> torch.Tensor:
    """Class probabilities of the crops' pixels as SFR sees them.

    Cosine logits, bilinear to the crop, PAMR, softmax over names at scale 40, max over each class's names.

    Args:
        features: ``(B, N, E)`` unit patch features of B crops.
        grid: ``(gh, gw)``.
        vocabulary: text features.
        affinity: ``(B, P, h, w)`` the crops' PAMR weights.

    Returns:
        ``(B, K, h, w)`` float32.
    """
    text = vocabulary.text_features.to(device=features.device, dtype=torch.float32)
    logits = (features.float() @ text.T).transpose(1, 2).reshape(len(features), -1, *grid)
    logits = F.interpolate(logits, size=affinity.shape[-2:], mode='bilinear', align_corners=False)
    probs = (pamr_refine(logits, affinity) * SFR_LOGIT_SCALE).softmax(dim=1)  # (B, names, h, w)
    index = vocabulary.name_to_class.to(features.device).view(1, -1, 1, 1).expand_as(probs)
    return probs.new_zeros(len(probs), vocabulary.num_classes, *probs.shape[2:]).scatter_reduce_(
        1, index, probs, reduce='amax')


@torch.inference_mode()
def resclip_second_pass(clip: ClipDense, windows: ResclipWindows, vocabulary: Vocabulary,
                        params: ResclipParams) -> torch.Tensor:
    """The vocabulary side: SFR and the second pass, per window (no image encoder runs).

    Returns:
        ``(B, gh*gw, E)`` float32 unit patch features.
    """
    if windows.affinity is None:
        raise ValueError('these windows were encoded without SFR (resclip_rcs)')
    patch = windows.affinity.shape[-1] // windows.grid[1]
    prior = neighbourhood_prior(windows.grid, NACLIP_GAUSSIAN_STD, windows.k.device)
    k = windows.k.float()
    key_logits = k @ k.transpose(-2, -1) * windows.scale
    outputs = []
    all_probs = crop_class_probabilities(windows.first, windows.grid, vocabulary, windows.affinity)
    for index, probs in enumerate(all_probs):
        feedback = sfr_matrix(patch_labels(probs, params.temp_thd, patch))
        feedback = feedback / feedback.max().clamp(min=1e-12)
        logits = params.sfr_tau * ((1 - params.sfr_lambda) * key_logits[index] + params.sfr_lambda * feedback)
        weights = mix((logits + prior).softmax(-1), windows.rcs[index], params.rcs_lambda)
        outputs.append(_output(clip, weights[None], windows.v[index:index + 1])[0])
    return torch.stack(outputs)



@dataclass
class ResclipFeatures(MethodFeatures):
    """ResCLIP's image side: ``dense`` (the first pass) on the token grid of the resized image.

    Attributes:
        windows: what the second pass needs, per window (None for ``resclip_rcs``).
        boxes: the windows' boxes in pixels of the resized image.
        token_grid: ``(Hg, Wg)`` of the spliced map.
    """

    windows: ResclipWindows | None = None
    boxes: list[Box] | None = None
    token_grid: tuple[int, int] | None = None


class ResclipMethod(ClipWindowMethod):
    """ResCLIP with its second pass at labelling (``sfr``), or its first pass only."""

    section = 'resclip'
    params = ResclipParams
    preset = MappingProxyType({**WINDOWS_336, 'resclip.rcs_lambda': 0.3, 'resclip.sfr_tau': 2.1,
                               'resclip.sfr_lambda': 0.7, 'resclip.temp_thd': 0.25})
    """yvhangyang/ResCLIP ``test_all.sh``: short side 336, windows 224/112, logit scale 40, ADE20K SFR weights."""
    features_type = ResclipFeatures

    def __init__(self, name: str, sfr: bool, summary: str) -> None:
        self.name = name
        self.sfr = sfr
        self.summary = summary

    def window_features(self, frame: Frame, crops: torch.Tensor, normalised: torch.Tensor, boxes: list[Box],
                        token_grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], dict[str, Any]]:
        windows = resclip_first_pass(frame.models.clip, normalised, frame.config.section(self.section),
                                     with_sfr=self.sfr, pixels=crops)
        extra = {'windows': windows, 'boxes': boxes, 'token_grid': token_grid} if self.sfr else {}
        return windows.first, windows.grid, extra

    def class_scores(self, features: ResclipFeatures, vocabulary: Vocabulary, labelling: Labelling) -> torch.Tensor:
        """``resclip``: SFR and the second pass per window (stage ``resclip_sfr``), spliced, then labelled."""
        if features.windows is None:
            return super().class_scores(features, vocabulary, labelling)
        clip = labelling.models.clip
        with labelling.stage('resclip_sfr'):
            second = resclip_second_pass(clip, features.windows, vocabulary, labelling.config.section(self.section))
            dense = splice_unit_features(second, features.windows.grid, features.boxes, features.token_grid,
                                         clip.patch_size)
        return labelling.probabilities(dense)


RESCLIP = ResclipMethod('resclip', sfr=True, summary='CLIP only, ResCLIP: RCS, then SFR per vocabulary')
RESCLIP_RCS = ResclipMethod('resclip_rcs', sfr=False, summary='CLIP only, ResCLIP without SFR (its first pass)')
