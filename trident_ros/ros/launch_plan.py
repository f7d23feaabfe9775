"""What ``launch/trident.launch.py`` starts, as plain data: no ROS here, so every leg tests it.

:func:`arguments` is the table of launch arguments; :func:`plan_launch` turns their values (strings,
as ``name:=value`` gives them) into a :class:`Plan`: the nodes with their parameters, remappings and
log level, the environment variables to set, and whether the lifecycle node is configured and
activated at the start. The launch file builds ``launch_ros`` actions from it;
:mod:`.node_starter` starts the same nodes as processes (:func:`command_line`) where
``launch`` is not installed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

PACKAGE = 'trident_ros'
PROFILE_VARIABLES = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')
"""Fast DDS 3.x (Kilted) reads the first, 2.x (Jazzy, Humble) the second."""

ParameterValue = bool | str
"""The types of the planned parameters (the node's are those of its declarations)."""


@dataclass(frozen=True)
class Argument:
    """One launch argument (``name:=value``); ``choices`` None: any string."""

    name: str
    default: str
    description: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PlannedNode:
    """One node process: what ``launch_ros``'s ``Node``/``LifecycleNode`` gets.

    Attributes:
        parameter_files: ROS parameter files, loaded in order.
        parameters: overrides applied after the files; the Python type is the parameter's type.
        remappings: ``(from, to)`` topic remappings.
        arguments: command-line arguments before ``--ros-args``.
        log_level: the node's log level; empty: ROS's default.
    """

    package: str
    executable: str
    name: str
    namespace: str = ''
    parameter_files: tuple[str, ...] = ()
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    remappings: tuple[tuple[str, str], ...] = ()
    arguments: tuple[str, ...] = ()
    log_level: str = ''
    lifecycle: bool = False

    @property
    def full_name(self) -> str:
        """``/<namespace>/<name>``, e.g. ``/robot1/trident``."""
        return '/' + '/'.join(part for part in (self.namespace.strip('/'), self.name) if part)


@dataclass(frozen=True)
class Plan:
    """The nodes to start, the environment variables to set for them, and autostart.

    Attributes:
        autostart: configure, then activate, each lifecycle node once after it starts.
    """

    nodes: tuple[PlannedNode, ...]
    environment: dict[str, str]
    autostart: bool


def arguments(share: str) -> list[Argument]:
    """The launch arguments; ``share``: the package's share directory (``config_file``'s default)."""
    return [
        Argument('image_topic', '/camera/image_raw', 'camera topic the node\'s "image" input is remapped to '
                                                     '(compressed transport: <image_topic>/compressed)'),
        Argument('vocabulary', '', 'classes, "," between classes, ";" between synonyms; empty: config_file'),
        Argument('device', '', 'auto, cpu, cuda or cuda:N; empty: config_file'),
        Argument('config_file', os.path.join(share, 'config', 'trident.yaml'), 'ROS parameters file of the node'),
        Argument('namespace', '', 'namespace of the node (and fake camera)'),
        Argument('use_rviz', 'false', 'start RViz with config/trident.rviz', ('true', 'false')),
        Argument('autostart', 'true', 'configure and activate the node (false: leave it to a lifecycle manager)',
                 ('true', 'false')),
        Argument('random_weights', '', 'SMOKE TEST: random weights, meaningless labels; empty: config_file',
                 ('', 'true', 'false')),
        Argument('model_scale', '', 'tiny: small architectures (needs random_weights); empty: config_file',
                 ('', 'full', 'tiny')),
        Argument('backend', '', 'torch, or onnxruntime: the exported encoder graphs via ONNX Runtime (TensorRT, '
                                'CUDA or CPU provider); empty: config_file', ('', 'torch', 'onnxruntime')),
        Argument('demo', 'false', 'also start fake_camera publishing the bundled sample images', ('true', 'false')),
        Argument('log_level', 'info', 'log level of the node'),
        Argument('use_depth', '', 'subscribe registered depth and publish ~/points, 3D masks and ~/detections_3d '
                                  '(and, with demo, a synthetic depth); empty: config_file', ('', 'true', 'false')),
        Argument('depth_topic', '/camera/depth/image_raw',
                 'registered depth topic the node\'s "depth" input is remapped to; its camera_info is '
                 '<its namespace>/camera_info'),
    ]


def argument_values(values: Mapping[str, str], share: str) -> dict[str, str]:
    """Every argument's value: ``values`` where given, else its default.

    Raises:
        ValueError: an unknown argument, or a value not among the argument's choices.
    """
    table = {argument.name: argument for argument in arguments(share)}
    unknown = sorted(set(values) - set(table))
    if unknown:
        raise ValueError(f'unknown launch arguments {unknown}; known: {sorted(table)}')
    resolved = {name: values.get(name, argument.default) for name, argument in table.items()}
    for name, value in resolved.items():
        choices = table[name].choices
        if choices is not None and value not in choices:
            raise ValueError(f'{name}:={value!r} is not one of {list(choices)}')
    return resolved


def profile_environment(share: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The Fast DDS profile variables to set: the package's profile (camera-sized messages) unless the user chose one.

    A profile the user set under either name is used under both, so it applies to Fast DDS 2.x and 3.x;
    variables already set are left alone (not in the result).
    """
    profile = next((environ[name] for name in PROFILE_VARIABLES if environ.get(name)),
                   os.path.join(share, 'config', 'fastdds_large_data.xml'))
    return {name: profile for name in PROFILE_VARIABLES if not environ.get(name)}


def plan_launch(values: Mapping[str, str], share: str, environ: Mapping[str, str]) -> Plan:
    """The plan of ``ros2 launch trident_ros trident.launch.py <name>:=<value> ...``.

    Args:
        values: launch argument values by name (strings); missing ones take their defaults.
        share: the package's share directory (config files).
        environ: the environment the nodes would inherit (the Fast DDS profile is set unless it has one).

    Raises:
        ValueError: see :func:`argument_values`.
    """
    args = argument_values(values, share)
    overrides: dict[str, ParameterValue] = {parameter: args[name] for name, parameter in (
        ('vocabulary', 'vocabulary'), ('device', 'models.device'), ('model_scale', 'models.model_scale'),
        ('backend', 'models.backend')) if args[name]}
    overrides.update({parameter: args[name] == 'true' for name, parameter in (
        ('random_weights', 'models.random_weights'), ('use_depth', 'depth.use')) if args[name]})
    image_topic, depth_topic = args['image_topic'], args['depth_topic']
    depth_remappings = (('depth', depth_topic), ('depth/camera_info', depth_topic.rsplit('/', 1)[0] + '/camera_info'))
    nodes = [PlannedNode(PACKAGE, 'trident_node', 'trident', args['namespace'], (args['config_file'],), overrides,
                         (('image', image_topic), ('image/compressed', image_topic.rstrip('/') + '/compressed'),
                          *depth_remappings), log_level=args['log_level'], lifecycle=True)]
    if args['demo'] == 'true':
        nodes.append(PlannedNode(PACKAGE, 'fake_camera', 'fake_camera', args['namespace'],
                                 parameters={'depth': args['use_depth'] == 'true'},
                                 remappings=(('image', image_topic), *depth_remappings)))
    if args['use_rviz'] == 'true':
        nodes.append(PlannedNode('rviz2', 'rviz2', 'rviz2',
                                 arguments=('-d', os.path.join(share, 'config', 'trident.rviz'))))
    return Plan(tuple(nodes), profile_environment(share, environ), args['autostart'] == 'true')


def yaml_string(text: str) -> str:
    """``text`` as a YAML double-quoted scalar, which YAML parsers (rcl's libyaml) read back as that string.

    Quotes and backslashes are escaped, and so is every character YAML does not allow as is (control
    characters, DEL, C1 controls) or reads as a line break (U+0085, U+2028, U+2029).
    """
    def allowed(code: int) -> bool:
        return 0x20 <= code <= 0x7E or (0xA0 <= code <= 0xFFFD and code not in (0x2028, 0x2029)) or code >= 0x10000

    escaped = ''.join('\\' + char if char in '"\\' else char if allowed(ord(char)) else f'\\u{ord(char):04x}'
                      for char in text)
    return f'"{escaped}"'


def parameter_text(value: ParameterValue) -> str:
    """``value`` as rcl reads it from ``-p name:=<text>``, keeping its type (a string ``'7'`` stays a string)."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return yaml_string(value)


def command_line(node: PlannedNode, prefix: str) -> list[str]:
    """The command that starts ``node`` (what ``launch_ros`` runs), its executable under ``prefix``.

    ``<prefix>/lib/<package>/<executable> [arguments] --ros-args -r __node:=<name> [-r __ns:=/<namespace>]
    [--params-file F ...] [-p name:=value ...] [-r from:=to ...] [--log-level L]``; overrides come after the
    files, so they win.
    """
    command = [os.path.join(prefix, 'lib', node.package, node.executable), *node.arguments,
               '--ros-args', '-r', f'__node:={node.name}']
    namespace = node.namespace.strip('/')
    if namespace:
        command += ['-r', f'__ns:=/{namespace}']
    for path in node.parameter_files:
        command += ['--params-file', path]
    for name, value in node.parameters.items():
        command += ['-p', f'{name}:={parameter_text(value)}']
    for source, target in node.remappings:
        command += ['-r', f'{source}:={target}']
    if node.log_level:
        command += ['--log-level', node.log_level]
    return command
