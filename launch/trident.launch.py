"""Launch the trident segmentation node (lifecycle), optionally a fake camera and RViz.

    ros2 launch trident_ros trident.launch.py image_topic:=/camera/image_raw
    ros2 launch trident_ros trident.launch.py demo:=true random_weights:=true model_scale:=tiny

With ``autostart:=true`` (default) the launch file configures and activates the node itself, once;
with ``autostart:=false`` it stays unconfigured for a lifecycle manager (e.g. Nav2's).
Launch arguments left empty keep the value from ``config_file``.
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
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from launch_ros.parameter_descriptions import ParameterValue
from lifecycle_msgs.msg import Transition

from launch import LaunchContext, LaunchDescription

PACKAGE = 'trident_ros'
# Fast DDS 3.x (Kilted) reads the first, 2.x (Jazzy, Humble) the second.
PROFILE_VARIABLES = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')


def _arguments(share: str) -> list[DeclareLaunchArgument]:
    return [
        DeclareLaunchArgument('image_topic', default_value='/camera/image_raw',
                              description='camera topic the node\'s "image" input is remapped to '
                                          '(compressed transport: <image_topic>/compressed)'),
        DeclareLaunchArgument('vocabulary', default_value='',
                              description='classes, "," between classes, ";" between synonyms; empty: config_file'),
        DeclareLaunchArgument('device', default_value='', description='auto, cpu, cuda or cuda:N; empty: config_file'),
        DeclareLaunchArgument('config_file', default_value=os.path.join(share, 'config', 'trident.yaml'),
                              description='ROS parameters file of the node'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the node (and fake camera)'),
        DeclareLaunchArgument('use_rviz', default_value='false', choices=['true', 'false'],
                              description='start RViz with config/trident.rviz'),
        DeclareLaunchArgument('autostart', default_value='true', choices=['true', 'false'],
                              description='configure and activate the node (false: leave it to a lifecycle manager)'),
        DeclareLaunchArgument('random_weights', default_value='', choices=['', 'true', 'false'],
                              description='SMOKE TEST: random weights, meaningless labels; empty: config_file'),
        DeclareLaunchArgument('model_scale', default_value='', choices=['', 'full', 'tiny'],
                              description='tiny: small architectures (needs random_weights); empty: config_file'),
        DeclareLaunchArgument('demo', default_value='false', choices=['true', 'false'],
                              description='also start fake_camera publishing the bundled sample images'),
        DeclareLaunchArgument('log_level', default_value='info', description='log level of the node'),
        DeclareLaunchArgument('use_depth', default_value='', choices=['', 'true', 'false'],
                              description='subscribe registered depth and publish ~/points, 3D masks and '
                                          '~/detections_3d (and, with demo, a synthetic depth); empty: config_file'),
        DeclareLaunchArgument('depth_topic', default_value='/camera/depth/image_raw',
                              description='registered depth topic the node\'s "depth" input is remapped to; its '
                                          'camera_info is <its namespace>/camera_info'),
    ]


def _profile_unless_set(context: LaunchContext) -> list:
    """Use the package's Fast DDS profile (camera-sized messages) unless the user chose one.

    A profile the user set under either variable name is used under both, so it applies to Fast DDS 2.x and 3.x.
    """
    chosen = [os.environ[name] for name in PROFILE_VARIABLES if os.environ.get(name)]
    if chosen:
        profile = chosen[0]
    else:
        profile = os.path.join(get_package_share_directory(PACKAGE), 'config', 'fastdds_large_data.xml')
    return [SetEnvironmentVariable(name, profile) for name in PROFILE_VARIABLES if not os.environ.get(name)]


def _nodes(context: LaunchContext) -> list:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    overrides = {}
    for name in ('vocabulary', 'device', 'model_scale'):
        if arg(name):
            overrides[name] = ParameterValue(arg(name), value_type=str)
    if arg('random_weights'):
        overrides['random_weights'] = arg('random_weights') == 'true'
    if arg('use_depth'):
        overrides['use_depth'] = arg('use_depth') == 'true'
    image_topic = arg('image_topic')
    depth_topic = arg('depth_topic')
    depth_remappings = [('depth', depth_topic), ('depth/camera_info', depth_topic.rsplit('/', 1)[0] + '/camera_info')]
    trident = LifecycleNode(
        package=PACKAGE, executable='trident_node', name='trident', namespace=arg('namespace'),
        parameters=[arg('config_file'), overrides],
        remappings=[('image', image_topic), ('image/compressed', image_topic.rstrip('/') + '/compressed'),
                    *depth_remappings],
        arguments=['--ros-args', '--log-level', arg('log_level')],
        output="screen")
    actions = [trident]
    if arg('autostart') == 'true':
        activate = EmitEvent(event=ChangeState(lifecycle_node_matcher=lambda action: action is trident,
                                               transition_id=Transition.TRANSITION_ACTIVATE))
        actions += [
            # handle_once: autostart is for the start only; a later configure (after deactivate and
            # cleanup) is the user's or a lifecycle manager's, and so is the activate after it.
            RegisterEventHandler(OnStateTransition(target_lifecycle_node=trident, start_state='configuring',
                                                   goal_state='inactive', entities=[activate], handle_once=True)),
            EmitEvent(event=ChangeState(lifecycle_node_matcher=lambda action: action is trident,
                                        transition_id=Transition.TRANSITION_CONFIGURE)),
        ]
    share = get_package_share_directory(PACKAGE)
    actions += [
        Node(package=PACKAGE, executable='fake_camera', name='fake_camera', namespace=arg('namespace'),
             parameters=[{'depth': arg('use_depth') == 'true'}],
             remappings=[('image', image_topic), *depth_remappings], output='screen',
             condition=IfCondition(arg('demo'))),
        Node(package='rviz2', executable='rviz2', name='rviz2',
             arguments=['-d', os.path.join(share, 'config', 'trident.rviz')],
             output='screen', condition=IfCondition(arg('use_rviz'))),
    ]
    return actions


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([
        *_arguments(share),
        OpaqueFunction(function=_profile_unless_set),
        OpaqueFunction(function=_nodes),
    ])
