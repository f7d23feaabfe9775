"""The trident node's parameters: dotted names, defaults, descriptors (ranges, choices), checks, the given ones.

Every field of :class:`TridentConfig` is a parameter under its dotted name (``labelling.prob_thd``,
``resclip.rcs_lambda``: nested YAML maps to these), plus the node's own (:data:`NODE_PARAMETERS`, the
``depth.*`` section among them). Numeric parameters carry a ``FloatingPointRange``/``IntegerRange``
(``ros2 param describe`` shows it, rclpy enforces it), string parameters with a fixed set of values name
them in ``additional_constraints``. :meth:`TridentConfig.validate` stays the authority on combinations
(e.g. ``windows.slide_stride <= windows.slide_crop``), the loaded models on crops (their patch sizes).

A config field is *given* when it was overridden at start (``-p``, a parameters file) or set later by a
user; the method's authors' preset fills in the others at configure (:meth:`TridentConfig.from_mapping`),
and the node writes the values that run back into the parameters.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import torch
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

from trident_ros import methods
from trident_ros.config import BACKENDS, MODEL_FIELDS, SAM_MODELS, ConfigError, TridentConfig
from trident_ros.pipeline import TridentPipeline
from trident_ros.vocabulary import parse_vocabulary


def config_specs() -> dict[str, Any]:
    """Dotted config name -> its :class:`~trident_ros.config.FieldSpec` (plain default, type, help), for the
    methods registered now (a plug-in registered later brings its section to nodes made after it).
    """
    return TridentConfig.field_specs()


IMAGE_TRANSPORTS = ('raw', 'compressed')
IMAGE_QOS = ('sensor_data', 'reliable')
OUTPUTS = ('segmentation', 'labels', 'confidence', 'masks')
DEPTH_PARAMETERS: dict[str, tuple[Any, str]] = {
    'depth.use': (False, 'subscribe depth (registered to the colour image, 16UC1 or 32FC1) and depth/camera_info; '
                         'publish the labelled organized cloud ~/points, 3D per ClassMask and ~/detections_3d'),
    'depth.scale': (0.001, 'metres per unit of a 16UC1 depth image (mm: 0.001)'),
    'depth.min': (0.0, 'nearer depth (metres) is no point'),
    'depth.max': (20.0, 'farther depth (metres) is no point'),
    'depth.sync_slop': (0.1, 'largest stamp difference (s) between an image and its depth; an image without one '
                             'is 2D only'),
    'depth.exact_sync': (False, 'the depth stamp must equal the image stamp'),
}
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
    **{name: (default, f'{text} [changes the depth subscriptions at once]')
       for name, (default, text) in DEPTH_PARAMETERS.items()},
}
DEPTH_FIELDS = frozenset(DEPTH_PARAMETERS)
"""The depth parameters: the depth subscriptions are made again when one changes (nothing is relabelled)."""
INT64_MAX = 2**63 - 1
MAX_CROP = 65536  # crops are checked against the loaded models' patch sizes, not a step here
RANGES: dict[str, tuple[float, float, float]] = {
    # dotted name: (from, to, step); step 0: any value in between
    'windows.input_short_side': (0, INT64_MAX, 1),
    'windows.max_long_side': (1, INT64_MAX, 1),
    'windows.slide_crop': (1, MAX_CROP, 1),
    'windows.slide_stride': (1, MAX_CROP, 1),
    'windows.clip_slide_crop': (1, MAX_CROP, 1),
    'windows.clip_slide_stride': (1, MAX_CROP, 1),
    'windows.reuse_threshold': (0.0, 255.0, 0.0),
    'labelling.text_cache_size': (1, INT64_MAX, 1),
    'labelling.max_classes': (1, INT64_MAX, 1),
    'labelling.logit_scale': (0.0, math.inf, 0.0),
    'labelling.prob_thd': (0.0, 1.0, 0.0),
    'labelling.area_thd': (0.0, 1.0, 0.0),
    'refinement.coarse_thresh': (0.0, 1.0, 0.0),
    'refinement.minimal_area': (1, INT64_MAX, 1),
    'refinement.sam_iou_thresh': (-math.inf, math.inf, 0.0),  # SAM's predicted IoU is unbounded; validate: finite
    'refinement.sam_mask_coff': (0.0, math.inf, 0.0),
    'trident.beta': (0.0, math.inf, 0.0),
    'trident.gamma': (0.0, math.inf, 0.0),  # > 0: TridentConfig.validate refuses 0 itself
    'trident.cos_fac': (0.0, math.inf, 0.0),
    'trident.aggregation_chunk': (1, INT64_MAX, 1),
    'proxy.beta': (0.0, math.inf, 0.0),
    'proxy.gamma': (0.0, math.inf, 0.0),
    'cliptrase.eps': (0.0, math.inf, 0.0),
    'cliptrase.min_samples': (0, INT64_MAX, 1),
    'corrclip.points_per_side': (1, INT64_MAX, 1),
    'corrclip.points_per_batch': (1, INT64_MAX, 1),
    'corrclip.pred_iou_thresh': (0.0, 1.0, 0.0),
    'corrclip.stability_score_thresh': (0.0, 1.0, 0.0),
    'corrclip.box_nms_thresh': (0.0, 1.0, 0.0),
    'corrclip.tau': (0.0, math.inf, 0.0),  # > 0: CorrclipParams.validate refuses 0 itself
    'corrclip.merge_threshold': (0.0, math.inf, 0.0),
    'corrclip.spatial_weight': (0.0, math.inf, 0.0),
    'corrclip.semantic_weight': (0.0, math.inf, 0.0),
    'corrclip.spatial_blocks': (0, INT64_MAX, 1),
    'resclip.rcs_lambda': (0.0, 1.0, 0.0),
    'resclip.sfr_tau': (0.0, math.inf, 0.0),  # > 0: TridentConfig.validate refuses 0 itself
    'resclip.sfr_lambda': (0.0, 1.0, 0.0),
    'resclip.temp_thd': (0.0, 1.0, 0.0),
    'max_input_pixels': (1, INT64_MAX, 1),
    'depth.scale': (0.0, math.inf, 0.0),  # > 0: checked here
    'depth.min': (0.0, math.inf, 0.0),
    'depth.max': (0.0, math.inf, 0.0),
    'depth.sync_slop': (0.0, math.inf, 0.0),
}
CHOICES: dict[str, tuple[str, ...]] = {
    'method': tuple(methods.names()),
    'models.sam_model': SAM_MODELS,
    'models.model_scale': ('full', 'tiny'),
    'models.device': ('auto', 'cpu', 'cuda', 'cuda:N'),
    'models.backend': BACKENDS,
    'image_transport': IMAGE_TRANSPORTS,
    'image_qos': IMAGE_QOS,
}


def parameter_defaults() -> dict[str, tuple[Any, str]]:
    """Every parameter of the node: dotted name -> (plain default, description)."""
    parameters = {}
    for name, spec in config_specs().items():
        note = ' [takes effect at the next configure]' if name in MODEL_FIELDS else ' [applies at once]'
        parameters[name] = (spec.default, f'{spec.help}{note} [not given: the method\'s preset, if it has one]')
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


def check_node_parameters(values: Mapping[str, Any], changes: Mapping[str, Any]) -> None:
    """Check the node's own parameters among ``changes`` to ``values`` (and the CUDA device).

    Raises:
        ValueError: naming the parameter and the reason.
    """
    if changes.get('image_transport', 'raw') not in IMAGE_TRANSPORTS:
        raise ValueError(f'image_transport={changes["image_transport"]!r}: '
                         f'must be one of {", ".join(IMAGE_TRANSPORTS)}')
    if changes.get('image_qos', 'reliable') not in IMAGE_QOS:
        raise ValueError(f'image_qos={changes["image_qos"]!r}: must be one of {", ".join(IMAGE_QOS)}')
    depth = {**{name: values[name] for name in DEPTH_FIELDS if name in values},
             **{name: value for name, value in changes.items() if name in DEPTH_FIELDS}}
    if 'depth.scale' in changes and not depth['depth.scale'] > 0:
        raise ValueError(f'depth.scale={depth["depth.scale"]!r}: must be > 0')
    if changes.keys() & {'depth.min', 'depth.max'} and not depth['depth.min'] < depth['depth.max']:
        raise ValueError(f'depth.min={depth["depth.min"]!r}, depth.max={depth["depth.max"]!r}: needs '
                         'depth.min < depth.max')
    device = changes.get('models.device', 'cpu')
    if isinstance(device, str) and device.startswith('cuda'):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device[5:]) if device[5:].isdigit() else 0
        if index >= count:
            raise ValueError(f'models.device={device!r}: this machine has {count} CUDA device(s)')


def check_crop(pipeline: TridentPipeline, config: TridentConfig) -> None:
    """Raise ConfigError unless ``config``'s crop fits the loaded models' patch sizes (as configure checks)."""
    name = pipeline.method.crop_field
    crop = config.flat().get(name) if name else None
    if crop is not None and crop % pipeline.crop_multiple:
        raise ConfigError(f'{name}={crop}: must be a multiple of {pipeline.crop_multiple}, the patch size of the '
                          'loaded models')


def check_changes(values: Mapping[str, Any], given: Collection[str], running: TridentConfig | None,
                  pipeline: TridentPipeline | None, changes: Mapping[str, Any]) -> None:
    """Check a batch of parameter ``changes`` (cheap checks only: nothing is encoded).

    Args:
        values: the node's parameter values as applied.
        given: the config names given so far.
        running: the configuration that runs (None: unconfigured).
        pipeline: the loaded models (None: unconfigured).
        changes: parameter name -> new value.

    Raises:
        ConfigError: the config fields do not make a valid :class:`TridentConfig` together.
        ValueError: a node parameter (or the CUDA device) is unusable.
        VocabularyError: ``vocabulary`` cannot be parsed (or has more than ``labelling.max_classes`` classes).
    """
    config_changes = {name: value for name, value in changes.items() if name in config_specs()}
    if running is None:
        config = config_from_values(values, {*given, *config_changes}, config_changes)
    else:
        config = running.replace(config_changes)
        if pipeline is not None and 'method' not in config_changes:
            check_crop(pipeline, config)
    check_node_parameters(values, changes)
    if 'vocabulary' in changes:
        parse_vocabulary(changes['vocabulary'], max_classes=config.labelling.max_classes)


def config_from_values(values: Mapping[str, Any], given: Collection[str],
                       changes: Mapping[str, Any] | None = None) -> TridentConfig:
    """The :class:`TridentConfig` of the ``given`` config names among ``values`` (and ``changes``).

    The method's preset fills in every name not given (:meth:`TridentConfig.from_mapping`); a given value
    equal to a plain default is kept. Raises ``ConfigError``.
    """
    merged = {**values, **(changes or {})}
    return TridentConfig.from_mapping({name: merged[name] for name in given if name in config_specs()})


def declare_parameters(node: Node) -> tuple[dict[str, str], set[str]]:
    """Declare every parameter on ``node``.

    Returns:
        Parameter -> why its start value is unusable, and the config names overridden at start (given).

    An override of the wrong type (e.g. ``big`` for an int) or out of range must not kill the
    process: the parameter is declared anyway and configure refuses with the reason until it is
    set again. An integer for a float (``40`` in YAML) is fine. Whether a start value was given is
    asked of rclpy by declaring the parameter once without a default (the override, or nothing).
    """
    bad_overrides, given = {}, set()
    for name, (default, description) in parameter_defaults().items():
        if name in config_specs():
            start = node.declare_parameter(name, None, ParameterDescriptor(dynamic_typing=True)).value
            node.undeclare_parameter(name)
            if start is not None:
                given.add(name)
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
    return bad_overrides, given


def coerce_parameters(parameters: list[Parameter]) -> list[Parameter]:
    """``ros2 param set /trident labelling.logit_scale 50``: an integer for a float parameter becomes a float."""
    out = []
    for param in parameters:
        if isinstance(DEFAULTS.get(param.name), float) and param.type_ == Parameter.Type.INTEGER:
            param = Parameter(param.name, Parameter.Type.DOUBLE, float(param.value))
        out.append(param)
    return out


DEFAULTS: dict[str, Any] = {name: default for name, (default, _) in parameter_defaults().items()}
"""Parameter name -> plain default."""
