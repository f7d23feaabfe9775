"""Launch the trident segmentation node (lifecycle), optionally a fake camera and RViz.

    ros2 launch trident_ros trident.launch.py image_topic:=/camera/image_raw
    ros2 launch trident_ros trident.launch.py demo:=true random_weights:=true model_scale:=tiny

With ``autostart:=true`` (default) the launch file configures and activates the node itself, once;
with ``autostart:=false`` it stays unconfigured for a lifecycle manager (e.g. Nav2's).
Launch arguments left empty keep the value from ``config_file``.

The decisions (arguments, nodes, parameters, remappings, environment, autostart) are
``trident_ros.ros.launch_plan``'s; this file only turns its plan into launch actions.
"""
from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import (
    DeclareLaunchArgument,
    EmitEvent,
    OpaqueFunction,
    RegisterEventHandler,
    SetEnvironmentVariable,
)
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.parameter_descriptions import ParameterValue
from lifecycle_msgs.msg import Transition

from launch import Action, LaunchContext, LaunchDescription
from trident_ros.ros.launch_plan import PACKAGE, PlannedNode, arguments, plan_launch


def _arguments(share: str) -> list[DeclareLaunchArgument]:
    return [DeclareLaunchArgument(argument.name, default_value=argument.default, description=argument.description,
                                  choices=list(argument.choices) if argument.choices is not None else None)
            for argument in arguments(share)]


def _node(planned: PlannedNode) -> Node:
    # strings stay strings (launch_ros would read '7' or 'true' as YAML); other values carry their type
    overrides = {name: ParameterValue(value, value_type=str) if isinstance(value, str) else value
                 for name, value in planned.parameters.items()}
    ros_arguments = ['--ros-args', '--log-level', planned.log_level] if planned.log_level else []
    kind = LifecycleNode if planned.lifecycle else Node
    return kind(package=planned.package, executable=planned.executable, name=planned.name,
                namespace=planned.namespace, parameters=[*planned.parameter_files, *([overrides] if overrides else [])],
                remappings=list(planned.remappings), arguments=[*planned.arguments, *ros_arguments],
                output='screen')


def _autostart(node: LifecycleNode) -> list[Action]:
    """Configure ``node`` now and activate it when that configure ends in inactive."""
    def change(transition_id: int) -> EmitEvent:
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=lambda action: action is node,
                                           transition_id=transition_id))

    return [
        # handle_once: autostart is for the start only; a later configure (after deactivate and
        # cleanup) is the user's or a lifecycle manager's, and so is the activate after it.
        RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, start_state='configuring',
                                               goal_state='inactive', entities=[change(Transition.TRANSITION_ACTIVATE)],
                                               handle_once=True)),
        change(Transition.TRANSITION_CONFIGURE),
    ]


def _actions(context: LaunchContext, share: str) -> list[Action]:
    values = {argument.name: LaunchConfiguration(argument.name).perform(context) for argument in arguments(share)}
    plan = plan_launch(values, share, os.environ)
    actions: list[Action] = [SetEnvironmentVariable(name, value) for name, value in plan.environment.items()]
    for planned in plan.nodes:
        node = _node(planned)
        actions.append(node)
        if planned.lifecycle and plan.autostart:
            actions += _autostart(node)
    return actions


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([*_arguments(share), OpaqueFunction(function=_actions, args=[share])])
