"""The trident node's parameters: names, defaults, descriptors (ranges, choices) and checks.

Every field of :class:`TridentConfig` is a parameter, plus the node's own (:data:`NODE_PARAMETERS`).
Numeric parameters carry a ``FloatingPointRange``/``IntegerRange`` (``ros2 param describe`` shows
it, rclpy enforces it), string parameters with a fixed set of values name them in
``additional_constraints``. :class:`TridentConfig.validate` stays the authority on combinations
(e.g. ``slide_stride <= slide_crop``); the ranges are its per-field limits, stated the ROS way.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

from trident_ros.config import METHODS, MODEL_SCALES, SAM_MODELS, TridentConfig
from trident_ros.methods.presets import METHOD_PRESETS
from trident_ros.pipeline import MODEL_FIELDS
from trident_ros.vocabulary import parse_vocabulary

CONFIG_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TridentConfig)}
IMAGE_TRANSPORTS = ('raw', 'compressed')
IMAGE_QOS = ('sensor_data', 'reliable')
OUTPUTS = ('segmentation', 'labels', 'confidence', 'masks')
NODE_PARAMETERS: dict[str, tuple[Any, str]] = {
    'vocabulary': ('', 'classes separated by ",", synonyms of one class by ";" (e.g. "sofa; couch, door"); '
                       'empty: none yet (frames are encoded, nothing is labelled until one arrives)'),
    'image_transport': ('raw', 'raw: subscribe "image" (sensor_msgs/Image); compressed: "image/compressed" '
                               '(sensor_msgs/CompressedImage)'),
    'image_qos': ('sensor_data', 'QoS of the image subscription: sensor_data (best effort, depth 1, matches '
                                 'every camera) or reliable (depth 1, only matches reliable publishers)'),
    'max_input_pixels': (16_777_216, 'images with more pixels (width*height) are refused with a warning, '
                                     'not downscaled (outputs keep the input pixel grid)'),
    'publish_segmentation': (True, 'publish ~/segmentation (rgb8 overlay with a legend)'),
    'publish_labels': (True, 'publish ~/labels (mono8, mono16 past 255 classes; 0 = unlabeled)'),
    'publish_confidence': (True, 'publish ~/confidence (mono8, probability * 255)'),
    'publish_masks': (True, 'publish ~/masks (trident_ros/ClassMaskArray)'),
}
INT64_MAX = 2**63 - 1
PATCH = 16  # crops must be whole patches of the ViT-B/16 encoders
MAX_CROP = 4096 * PATCH
RANGES: dict[str, tuple[float, float, float]] = {
    # name: (from, to, step); step 0: any value in between
    'input_short_side': (0, INT64_MAX, 1),
    'max_long_side': (1, INT64_MAX, 1),
    'slide_crop': (PATCH, MAX_CROP, PATCH),
    'slide_stride': (1, MAX_CROP, 1),
    'clip_slide_crop': (PATCH, MAX_CROP, PATCH),
    'clip_slide_stride': (1, MAX_CROP, 1),
    'aggregation_chunk': (1, INT64_MAX, 1),
    'minimal_area': (1, INT64_MAX, 1),
    'text_cache_size': (1, INT64_MAX, 1),
    'max_classes': (1, INT64_MAX, 1),
    'max_input_pixels': (1, INT64_MAX, 1),
    'beta': (0.0, math.inf, 0.0),
    'gamma': (0.0, math.inf, 0.0),  # > 0: TridentConfig.validate refuses 0 itself
    'cos_fac': (0.0, math.inf, 0.0),
    'logit_scale': (0.0, math.inf, 0.0),
    'reuse_threshold': (0.0, 255.0, 0.0),
    'prob_thd': (0.0, 1.0, 0.0),
    'coarse_thresh': (0.0, 1.0, 0.0),
    'sam_iou_thresh': (-math.inf, math.inf, 0.0),  # SAM's predicted IoU is unbounded; validate wants it finite
    'sam_mask_coff': (0.0, math.inf, 0.0),
    'area_thd': (0.0, 1.0, 0.0),
    'cliptrase_eps': (0.0, math.inf, 0.0),
    'cliptrase_min_samples': (0, INT64_MAX, 1),
    'resclip_rcs_lambda': (0.0, 1.0, 0.0),
    'resclip_sfr_tau': (0.0, math.inf, 0.0),  # > 0: TridentConfig.validate refuses 0 itself
    'resclip_sfr_lambda': (0.0, 1.0, 0.0),
    'resclip_temp_thd': (0.0, 1.0, 0.0),
    'depth_scale': (0.0, math.inf, 0.0),  # > 0: TridentConfig.validate refuses 0 itself
    'min_depth': (0.0, math.inf, 0.0),
    'max_depth': (0.0, math.inf, 0.0),
    'sync_slop': (0.0, math.inf, 0.0),
}
CHOICES: dict[str, tuple[str, ...]] = {
    'method': METHODS,
    'sam_model': SAM_MODELS,
    'model_scale': MODEL_SCALES,
    'device': ('auto', 'cpu', 'cuda', 'cuda:N'),
    'image_transport': IMAGE_TRANSPORTS,
    'image_qos': IMAGE_QOS,
}


def parameter_defaults() -> dict[str, tuple[Any, str]]:
    """Every parameter of the node: name -> (default, description)."""
    defaults = TridentConfig()
    parameters = {}
    for name in CONFIG_FIELDS:
        note = ' [takes effect at the next configure]' if name in MODEL_FIELDS else ' [applies at once]'
        presets = [f'{method}: {preset[name]}' for method, preset in METHOD_PRESETS.items() if name in preset]
        if presets:  # what each method's preset makes of the field while it stays at this default
            note += f' [left at this default, the method\'s preset applies: {", ".join(presets)}]'
        parameters[name] = (getattr(defaults, name), TridentConfig.describe(name) + note)
    parameters.update(NODE_PARAMETERS)
    return parameters


def descriptor(name: str, description: str, dynamic_typing: bool = False) -> ParameterDescriptor:
    """The descriptor of parameter ``name``: description, range or choices.

    Args:
        name: a parameter of :func:`parameter_defaults`.
        description: its description.
        dynamic_typing: declare it without a fixed type (an override of the wrong type was given;
            the node refuses to configure until it is set again).

    Returns:
        The descriptor; ranges apply to values of the declared type only.
    """
    result = ParameterDescriptor(description=description, dynamic_typing=dynamic_typing)
    if name in RANGES:
        low, high, step = RANGES[name]
        if isinstance(low, int):
            result.integer_range = [IntegerRange(from_value=low, to_value=high, step=step)]
        else:
            result.floating_point_range = [FloatingPointRange(from_value=low, to_value=high, step=step)]
    if name in CHOICES:
        result.additional_constraints = f'one of: {", ".join(CHOICES[name])}'
    return result


def check_node_parameters(changes: Mapping[str, Any]) -> None:
    """Check the node's own parameters (and the CUDA device) among ``changes``.

    Raises:
        ValueError: naming the parameter and the reason.
    """
    if changes.get('image_transport', 'raw') not in IMAGE_TRANSPORTS:
        raise ValueError(f'image_transport={changes["image_transport"]!r}: '
                         f'must be one of {", ".join(IMAGE_TRANSPORTS)}')
    if changes.get('image_qos', 'reliable') not in IMAGE_QOS:
        raise ValueError(f'image_qos={changes["image_qos"]!r}: must be one of {", ".join(IMAGE_QOS)}')
    device = changes.get('device', 'cpu')
    if isinstance(device, str) and device.startswith('cuda'):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device[5:]) if device[5:].isdigit() else 0
        if index >= count:
            raise ValueError(f'device={device!r}: this machine has {count} CUDA device(s)')


def check_changes(values: Mapping[str, Any], changes: Mapping[str, Any]) -> None:
    """Check a batch of parameter ``changes`` to the node's ``values`` (cheap checks only: nothing is encoded).

    Raises:
        ConfigError: the config fields do not make a valid :class:`TridentConfig` together.
        ValueError: a node parameter (or the CUDA device) is unusable.
        VocabularyError: ``vocabulary`` cannot be parsed (or has more than ``max_classes`` classes).
    """
    config = config_from_values({**values, **changes})
    check_node_parameters(changes)
    if 'vocabulary' in changes:
        parse_vocabulary(changes['vocabulary'], max_classes=config.max_classes)


def config_from_values(values: Mapping[str, Any]) -> TridentConfig:
    """The :class:`TridentConfig` of the config fields among ``values``; raises ``ConfigError``.

    A field left at its plain default counts as not set: the method's preset applies to it
    (:func:`.presets.with_presets`, as for a YAML file that does not name the field).
    """
    defaults = TridentConfig()
    given = {name: value for name, value in values.items()
             if name in CONFIG_FIELDS and (name == 'method' or value != getattr(defaults, name))}
    return TridentConfig.from_dict(given)


def declare_parameters(node: Node) -> dict[str, str]:
    """Declare every parameter on ``node``; returns parameter -> why its start value is unusable.

    An override of the wrong type (e.g. ``big`` for an int) or out of range must not kill the
    process: the parameter is declared anyway and configure refuses with the reason until it is
    set again. An integer for a float (``40`` in YAML) is fine.
    """
    bad_overrides = {}
    for name, (default, description) in parameter_defaults().items():
        try:
            node.declare_parameter(name, default, descriptor(name, description))
        except InvalidParameterTypeException as error:
            node.declare_parameter(name, default, descriptor(name, description, dynamic_typing=True))
            value = node.get_parameter(name).value
            if not (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)):
                bad_overrides[name] = str(error)
        except InvalidParameterValueException as error:
            node.declare_parameter(name, default, descriptor(name, description), ignore_override=True)
            bad_overrides[name] = str(error)
    return bad_overrides


def coerce_parameters(parameters: list[Parameter]) -> list[Parameter]:
    """``ros2 param set /trident logit_scale 50``: an integer for a float parameter becomes a float."""
    out = []
    for param in parameters:
        field = CONFIG_FIELDS.get(param.name)
        if field is not None and isinstance(field.default, float) and param.type_ == Parameter.Type.INTEGER:
            param = Parameter(param.name, Parameter.Type.DOUBLE, float(param.value))
        out.append(param)
    return out
