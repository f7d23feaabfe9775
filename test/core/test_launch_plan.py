"""trident_ros.ros.launch_plan: the launch file's decisions as plain data (no ROS: every leg runs this)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trident_ros.ros.launch_plan import (
    PROFILE_VARIABLES,
    Plan,
    PlannedNode,
    argument_values,
    arguments,
    command_line,
    parameter_text,
    plan_launch,
    profile_environment,
)

ROOT = Path(__file__).resolve().parents[2]
SHARE = str(ROOT)  # the source tree has the share directory's config/ and launch/
NO_PROFILE: dict[str, str] = {}


def node(plan: Plan, name: str) -> PlannedNode:
    [found] = [n for n in plan.nodes if n.name == name]
    return found


def test_the_arguments_table_has_every_argument_with_a_description_and_its_default():
    table = {argument.name: argument for argument in arguments(SHARE)}
    assert set(table) == {'image_topic', 'vocabulary', 'device', 'config_file', 'namespace', 'use_rviz', 'autostart',
                          'random_weights', 'model_scale', 'backend', 'demo', 'log_level', 'use_depth',
                          'depth_topic'}
    assert all(argument.description for argument in table.values())
    assert table['autostart'].default == 'true' and table['autostart'].choices == ('true', 'false')
    assert table['model_scale'].choices == ('', 'full', 'tiny') and table['vocabulary'].choices is None
    config_default = Path(table['config_file'].default)
    assert config_default.name == 'trident.yaml' and config_default.is_file()
    for argument in table.values():
        assert argument.choices is None or argument.default in argument.choices, argument.name


def test_argument_values_fill_defaults_and_refuse_unknown_names_and_values_outside_the_choices():
    values = argument_values({'demo': 'true'}, SHARE)
    assert values['demo'] == 'true' and values['image_topic'] == '/camera/image_raw' and values['vocabulary'] == ''
    with pytest.raises(ValueError, match='unknown launch arguments'):
        argument_values({'image_topc': '/x'}, SHARE)
    with pytest.raises(ValueError, match='not one of'):
        argument_values({'model_scale': 'huge'}, SHARE)


def test_defaults_plan_the_lifecycle_node_alone_with_the_yaml_and_the_remaps():
    plan = plan_launch({}, SHARE, NO_PROFILE)
    [trident] = plan.nodes
    assert plan.autostart
    assert (trident.package, trident.executable, trident.name, trident.namespace) == (
        'trident_ros', 'trident_node', 'trident', '')
    assert trident.lifecycle and trident.full_name == '/trident' and trident.log_level == 'info'
    assert trident.parameter_files == (str(ROOT / 'config' / 'trident.yaml'),)
    assert trident.parameters == {}  # empty arguments keep the YAML's values
    assert dict(trident.remappings) == {'image': '/camera/image_raw',
                                        'image/compressed': '/camera/image_raw/compressed',
                                        'depth': '/camera/depth/image_raw',
                                        'depth/camera_info': '/camera/depth/camera_info'}


def test_given_arguments_become_typed_overrides_remaps_namespace_and_log_level():
    plan = plan_launch({'vocabulary': '7', 'device': 'cpu', 'model_scale': 'tiny', 'random_weights': 'true',
                        'backend': 'onnxruntime', 'use_depth': 'false', 'namespace': 'robot1',
                        'image_topic': '/cam/rgb/',
                        'depth_topic': '/cam/aligned/depth', 'log_level': 'warn', 'config_file': '/my.yaml',
                        'autostart': 'false'}, SHARE, NO_PROFILE)
    [trident] = plan.nodes
    assert not plan.autostart
    # strings stay strings ('7' too), the true/false arguments become booleans
    assert trident.parameters == {'vocabulary': '7', 'models.device': 'cpu', 'models.model_scale': 'tiny',
                                  'models.backend': 'onnxruntime', 'models.random_weights': True,
                                  'depth.use': False}  # the node's dotted names
    assert trident.parameter_files == ('/my.yaml',) and trident.log_level == 'warn'
    assert trident.full_name == '/robot1/trident'
    assert dict(trident.remappings) == {'image': '/cam/rgb/', 'image/compressed': '/cam/rgb/compressed',
                                        'depth': '/cam/aligned/depth', 'depth/camera_info': '/cam/aligned/camera_info'}


def test_demo_adds_the_fake_camera_on_the_same_topics_and_use_rviz_adds_rviz():
    assert [n.name for n in plan_launch({'demo': 'false', 'use_rviz': 'false'}, SHARE, NO_PROFILE).nodes] == ['trident']
    plan = plan_launch({'demo': 'true', 'use_depth': 'true', 'namespace': 'robot1', 'use_rviz': 'true'}, SHARE,
                       NO_PROFILE)
    camera, trident, rviz = node(plan, 'fake_camera'), node(plan, 'trident'), node(plan, 'rviz2')
    assert (camera.executable, camera.namespace, camera.lifecycle) == ('fake_camera', 'robot1', False)
    assert camera.parameters == {'depth': True}
    assert set(camera.remappings) == set(trident.remappings) - {('image/compressed', '/camera/image_raw/compressed')}
    assert node(plan_launch({'demo': 'true'}, SHARE, NO_PROFILE), 'fake_camera').parameters == {'depth': False}
    assert (rviz.package, rviz.executable, rviz.lifecycle) == ('rviz2', 'rviz2', False)
    assert rviz.arguments == ('-d', str(ROOT / 'config' / 'trident.rviz')) and Path(rviz.arguments[1]).is_file()


def test_fastdds_profile_is_set_only_when_the_user_has_none():
    """Both names get the package's profile, or the user's own one from whichever name the user set.

    Fast DDS 3.x (Kilted) reads FASTDDS_..., 2.x (Jazzy, Humble) FASTRTPS_...
    """
    assert PROFILE_VARIABLES == ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')
    environment = profile_environment(SHARE, {'PATH': '/bin'})
    assert list(environment) == list(PROFILE_VARIABLES)
    [profile] = set(environment.values())
    assert Path(profile).name == 'fastdds_large_data.xml' and Path(profile).is_file()
    assert profile_environment(SHARE, dict.fromkeys(PROFILE_VARIABLES, '')) == environment  # empty: not set
    for own, other in (PROFILE_VARIABLES, PROFILE_VARIABLES[::-1]):
        assert profile_environment(SHARE, {own: '/users/own/profile.xml'}) == {other: '/users/own/profile.xml'}
    assert profile_environment(SHARE, dict.fromkeys(PROFILE_VARIABLES, '/users/own/profile.xml')) == {}
    assert plan_launch({}, SHARE, {}).environment == environment


@pytest.mark.parametrize('value', ['1, 2', '7', '-3.5', 'true', 'no', 'null', '', "it's", 'a "quoted" ; b\\c',
                                   'tür 🚪, 椅子', '[x, y]', '{a: 1}', '# x', 'x: y', '&a *b', 'line\nbreak\ttab',
                                   'del\x7f c1\x85 ls\u2028 bell\x07'])
def test_string_parameters_are_rendered_so_yaml_reads_back_the_same_string(value):
    """The node reads ``-p name:=<text>`` as YAML (rcl: libyaml): strings that look like numbers, booleans,
    YAML syntax or hold characters YAML escapes must come back unchanged, as strings.
    """
    assert yaml.safe_load(parameter_text(value)) == value


@pytest.mark.parametrize('value', [True, False])
def test_boolean_parameters_stay_booleans(value):
    assert yaml.safe_load(parameter_text(value)) is value


def test_command_line_starts_the_installed_executable_with_name_namespace_files_overrides_remaps_and_log_level():
    trident = node(plan_launch({'namespace': '/robot1/', 'vocabulary': '1, 2', 'random_weights': 'true',
                                'log_level': 'debug'}, SHARE, NO_PROFILE), 'trident')
    command = command_line(trident, '/opt/prefix')
    assert command[:4] == ['/opt/prefix/lib/trident_ros/trident_node', '--ros-args', '-r', '__node:=trident']
    pairs = list(zip(command[2::2], command[3::2], strict=True))  # everything after --ros-args is (flag, value)
    assert ('-r', '__ns:=/robot1') in pairs
    assert ('--params-file', str(ROOT / 'config' / 'trident.yaml')) in pairs
    assert ('-p', 'vocabulary:="1, 2"') in pairs and ('-p', 'models.random_weights:=true') in pairs
    # overrides after the file: rcl applies them in order, so they win
    assert pairs.index(('-p', 'vocabulary:="1, 2"')) > pairs.index(('--params-file', trident.parameter_files[0]))
    assert ('-r', 'image:=/camera/image_raw') in pairs
    assert ('-r', 'depth/camera_info:=/camera/depth/camera_info') in pairs
    assert pairs[-1] == ('--log-level', 'debug')
    rviz = node(plan_launch({'use_rviz': 'true'}, SHARE, NO_PROFILE), 'rviz2')
    rviz_command = command_line(rviz, '/opt/ros')
    assert rviz_command[:4] == ['/opt/ros/lib/rviz2/rviz2', '-d', str(ROOT / 'config' / 'trident.rviz'), '--ros-args']
    assert '__ns:=' not in ' '.join(rviz_command) and '--log-level' not in rviz_command
