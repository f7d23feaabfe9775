"""The method interface, and what the pipeline hands a method at each call.

A method is one object registered under its name (:func:`trident_ros.methods.register`). It says which models it
needs, its parameters section (a frozen dataclass whose defaults are the plain defaults; one section may serve
several methods) and its authors' preset (dotted config names -> values, applied by
:meth:`trident_ros.config.TridentConfig.from_mapping` to the names a user did not give). The pipeline calls
:meth:`Method.encode_image` once per frame (the result, the method's own features dataclass, is cached with the
frame), then per vocabulary :meth:`Method.class_scores`, :meth:`Method.refine` and :meth:`Method.label`.

``config`` below is a :class:`trident_ros.config.TridentConfig`; the config module imports this room (for the
registry), so this room never imports it back.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from trident_ros.labelling import label_map
from trident_ros.models import TridentModels
from trident_ros.vocabulary import Vocabulary

Stage = Callable[[str], AbstractContextManager[None]]
"""``with stage('clip'): ...`` times a named stage of the frame (seconds land in the frame's timings)."""


def setting(default: Any, help_text: str) -> Any:
    """A section field with its default and help text (the node declares one parameter per field)."""
    return field(default=default, metadata={'help': help_text})


class ParamError(ValueError):
    """A parameter of a section is invalid: ``name`` (the field, without its section) and ``why``."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f'{name}: {why}')
        self.name = name
        self.why = why


@dataclass
class MethodFeatures:
    """The image side every method yields; a method's own features dataclass extends it.

    Attributes:
        dense: ``(E, hs, ws)`` L2-normalised dense CLIP features on the method's token grid.
    """

    dense: torch.Tensor


@dataclass
class Frame:
    """One frame as a method's image side gets it.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        config: the pipeline's configuration.
        models: the loaded models (those the method needs).
        stage: times a named stage.
        patch: pixels the resized image and the window boxes are multiples of (the least common multiple of the
            patch sizes of the method's window models).
        timings: seconds per stage so far (``stage`` writes here; a method may split a fused stage).
        graphs: with ``models.backend: onnxruntime``, the method's open graphs
            (:class:`~trident_ros.runtime.onnx_runtime.OnnxGraphs`; a stage runs its graph where ``graphs.has`` it);
            None: torch.
    """

    image: np.ndarray
    config: Any
    models: TridentModels
    stage: Stage
    patch: int
    timings: dict[str, float]
    graphs: Any = None


@dataclass
class Labelling:
    """What a method's vocabulary side gets.

    Attributes:
        config: the pipeline's configuration.
        models: the loaded models.
        stage: times a named stage.
        original_size: ``(H, W)`` of the frame: outputs are at this size.
        probabilities: dense ``(E, hs, ws)`` -> ``(K, H, W)`` class probabilities with the common labelling settings
            (logit scale, PAMR, area threshold), timed as ``labelling``.
        graphs: as :attr:`Frame.graphs`.
    """

    config: Any
    models: TridentModels
    stage: Stage
    original_size: tuple[int, int]
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    graphs: Any = None


class Method:
    """A segmentation method. Subclasses set the class attributes and implement :meth:`encode_image`.

    Attributes:
        name: the registry name (``config.method``).
        models: the models it needs, of ``clip``, ``dino``, ``sam`` (only these are loaded).
        window_models: the models its windows are cut for: crops are multiples of each one's patch size.
        crop_field: the dotted config name of its window crop (validated against those patch sizes).
        stride_field: the dotted config name of its window stride.
        refines: whether it refines its labels with SAM (``refinement.*`` applies).
        section: the name of its parameters section (``config.section(name)``), or None.
        params: its parameters dataclass (frozen; defaults are the plain defaults), or None.
        preset: its authors' values, dotted config name -> value, for the names a user does not give.
        summary: one line for help texts.
    """

    name: str = ''
    models: tuple[str, ...] = ('clip',)
    window_models: tuple[str, ...] = ('clip',)
    crop_field: str = 'windows.clip_slide_crop'
    stride_field: str = 'windows.clip_slide_stride'
    refines: bool = False
    section: str | None = None
    params: type | None = None
    preset: Mapping[str, Any] = MappingProxyType({})
    summary: str = ''

    def graphs(self, config: Any) -> tuple[tuple[str, int], ...]:
        """The graphs it exports under ``config`` (``models.backend: onnxruntime``): ``(kind, crop)`` pairs, crop 0
        where the graph bakes none (:mod:`trident_ros.runtime.graphs`). By default none: it runs on torch.
        """
        return ()

    def encode_image(self, frame: Frame) -> MethodFeatures:
        """The image side of one frame (every image encoder the method runs): its features dataclass."""
        raise NotImplementedError

    def class_scores(self, features: MethodFeatures, vocabulary: Vocabulary, labelling: Labelling) -> torch.Tensor:
        """``(K, H, W)`` class probabilities of a frame for a vocabulary (no image encoder runs)."""
        return labelling.probabilities(features.dense)

    def refine(self, probs: torch.Tensor, features: MethodFeatures,
               labelling: Labelling) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Optional refinement: ``(scores (K, H, W), refined (H, W) bool or None)``; by default none."""
        return probs, None

    def label(self, probs: torch.Tensor, features: MethodFeatures, refined: torch.Tensor | None,
              labelling: Labelling) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (H, W), confidence (H, W))`` from the scores; by default the thresholded argmax."""
        return label_map(probs, labelling.config.labelling.prob_thd, exempt=refined)
