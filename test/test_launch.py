"""launch/trident.launch.py, config/trident.yaml and config/trident.rviz, parsed and run for real."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState

# ros_helpers first: it checks the ROS 2 environment with a clear message
from ros_helpers import LATCHED, RELIABLE, ROOT, RosProcess, TestNode, fresh_domain_id, ros2_cli, ros_env, wait_until
from sensor_msgs.msg import Image
from trident_ros.msg import VocabularyInfo

from trident_ros.config import TridentConfig
from trident_ros.node_parameters import NODE_PARAMETERS, OUTPUTS
from trident_ros.vocabulary import parse_vocabulary

pytestmark = pytest.mark.ros
LAUNCH_FILE = ROOT / 'launch' / 'trident.launch.py'
CONFIG_FILE = ROOT / 'config' / 'trident.yaml'
RVIZ_FILE = ROOT / 'config' / 'trident.rviz'
CONFIG_FIELDS = [f.name for f in dataclasses.fields(TridentConfig)]


def load_launch_module():
    spec = importlib.util.spec_from_file_location('trident_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yaml_parameters() -> dict:
    return yaml.safe_load(CONFIG_FILE.read_text())['/**/trident']['ros__parameters']


def test_launch_description_declares_the_arguments():
    description = load_launch_module().generate_launch_description()
    arguments = {a.name: a for a in description.entities if isinstance(a, DeclareLaunchArgument)}
    assert set(arguments) == {'image_topic', 'vocabulary', 'device', 'config_file', 'namespace', 'use_rviz',
                              'autostart', 'random_weights', 'model_scale', 'demo', 'log_level', 'use_depth',
                              'depth_topic'}
    assert arguments['autostart'].default_value[0].text == 'true'
    config_default = Path(arguments['config_file'].default_value[0].text)
    assert config_default.name == 'trident.yaml' and config_default.is_file()
    assert all(a.description for a in arguments.values())


def test_fastdds_profile_is_set_only_when_the_user_has_none(monkeypatch):
    """Both names get the package's profile, or the user's own one from whichever name the user set.

    Fast DDS 3.x (Kilted) reads FASTDDS_..., 2.x (Jazzy, Humble) FASTRTPS_...
    """
    module = load_launch_module()
    names = ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')
    for name in names:
        monkeypatch.delenv(name, raising=False)
    actions = module._profile_unless_set(None)
    assert all(isinstance(action, SetEnvironmentVariable) for action in actions)
    assert [action.name[0].text for action in actions] == list(names)
    profiles = {Path(action.value[0].text) for action in actions}
    assert len(profiles) == 1
    [profile] = profiles
    assert profile.name == 'fastdds_large_data.xml' and profile.is_file()
    for own in names:
        other = names[1 - names.index(own)]
        monkeypatch.delenv(other, raising=False)
        monkeypatch.setenv(own, '/users/own/profile.xml')
        [action] = module._profile_unless_set(None)
        assert (action.name[0].text, action.value[0].text) == (other, '/users/own/profile.xml')
        monkeypatch.setenv(other, '/users/own/other.xml')
        assert module._profile_unless_set(None) == []
        monkeypatch.delenv(own)


def test_yaml_has_every_parameter_with_reference_defaults_and_a_comment():
    parameters = yaml_parameters()
    assert set(parameters) == set(CONFIG_FIELDS) | set(NODE_PARAMETERS)
    reference = TridentConfig()
    for name in CONFIG_FIELDS:
        assert parameters[name] == getattr(reference, name), name
    assert TridentConfig.from_yaml(CONFIG_FILE) == reference
    parse_vocabulary(parameters['vocabulary'])  # the default vocabulary is valid
    lines = CONFIG_FILE.read_text().splitlines()
    for name in parameters:
        index = next(i for i, line in enumerate(lines) if re.match(rf'\s+{name}:', line))
        commented = '#' in lines[index] or lines[index - 1].strip().startswith('#')
        assert commented, f'{name} has no comment'


def rviz_topics(display_class: str = 'rviz_default_plugins/Image') -> list[str]:
    config = yaml.safe_load(RVIZ_FILE.read_text())
    displays = config['Visualization Manager']['Displays']
    assert {d['Class'] for d in displays} <= {'rviz_default_plugins/Image', 'rviz_default_plugins/PointCloud2'}
    return [d['Topic']['Value'] for d in displays if d['Class'] == display_class]


def test_rviz_config_parses_and_names_the_input_and_node_outputs():
    topics = rviz_topics()
    image_topic = next(a for a in load_launch_module()._arguments(str(ROOT)) if a.name == 'image_topic')
    assert topics[0] == image_topic.default_value[0].text
    assert {'/trident/segmentation', '/trident/labels'} <= set(topics)
    assert set(topics[1:]) <= {f'/trident/{name}' for name in OUTPUTS}


def test_rviz_config_shows_the_points_coloured_by_class():
    config = yaml.safe_load(RVIZ_FILE.read_text())
    [cloud] = [d for d in config['Visualization Manager']['Displays'] if d['Class'].endswith('/PointCloud2')]
    assert cloud['Topic']['Value'] == '/trident/points' and cloud['Color Transformer'] == 'RGB8'


@pytest.fixture
def launch_env(tmp_path):
    domain = fresh_domain_id()
    client = TestNode(domain, 'launch_test')
    yield ros_env(domain, tmp_path), client
    client.close()


def test_demo_launch_runs_with_the_yaml_remaps_and_stops_on_sigint(launch_env, tmp_path):
    env, client = launch_env
    labels = client.subscribe(Image, '/trident/labels')
    info = client.subscribe(VocabularyInfo, '/trident/vocabulary_info', LATCHED)
    process = RosProcess(['ros2', 'launch', 'trident_ros', 'trident.launch.py', 'demo:=true',
                          'random_weights:=true', 'model_scale:=tiny'], env, tmp_path / 'launch.log')
    try:
        # autostart: nobody calls a lifecycle service, yet outputs of the fake camera's frames arrive
        assert labels.wait_for(lambda m: m.header.frame_id == 'camera' and (m.width, m.height) == (640, 480),
                               90), process.output()
        yaml_classes = ['; '.join(names) for names in parse_vocabulary(yaml_parameters()['vocabulary']).classes]
        assert info.wait_for(lambda m: list(m.classes) == yaml_classes, 10) is not None  # the YAML is loaded
        subscribers = client.node.get_subscriptions_info_by_topic('/camera/image_raw')
        assert any(s.node_name == 'trident' for s in subscribers)  # `image` remapped to image_topic
        topics = {name for name, _ in client.node.get_topic_names_and_types()}
        assert set(rviz_topics()) <= topics, topics
        sent = time.monotonic()
        process.signal_group(signal.SIGINT)  # what Ctrl-C in a terminal does
        code = process.popen.wait(10)
        elapsed = time.monotonic() - sent
    finally:
        process.stop()
    assert code == 0 and elapsed < 2.0, (code, elapsed, process.output())
    assert re.search(r'trident_node-\d+\]: process has finished cleanly', process.output()), process.output()


def test_autostart_false_leaves_the_node_to_a_lifecycle_manager(launch_env, tmp_path):
    env, client = launch_env
    process = RosProcess(['ros2', 'launch', 'trident_ros', 'trident.launch.py', 'autostart:=false',
                          'random_weights:=true', 'model_scale:=tiny', 'namespace:=robot1'],
                         env, tmp_path / 'launch.log')
    try:
        get_state = client.node.create_client(GetState, '/robot1/trident/get_state')
        assert get_state.wait_for_service(timeout_sec=60), process.output()
        time.sleep(1.0)
        future = get_state.call_async(GetState.Request())
        assert wait_until(future.done, 10)
        assert future.result().current_state.label == 'unconfigured'
    finally:
        assert process.stop() == 0, process.output()


def test_autostart_happens_once_and_a_later_configure_is_left_to_the_user(launch_env, tmp_path):
    """After deactivate, cleanup, configure the node stays inactive: the user's activate works."""
    env, client = launch_env
    process = RosProcess(['ros2', 'launch', 'trident_ros', 'trident.launch.py', 'random_weights:=true',
                          'model_scale:=tiny'], env, tmp_path / 'launch.log')

    def state() -> str:
        return client.call(GetState, '/trident/get_state', GetState.Request()).current_state.label

    def change(transition_id: int) -> bool:
        request = ChangeState.Request()
        request.transition.id = transition_id
        return client.call(ChangeState, '/trident/change_state', request, timeout=120).success
    try:
        assert wait_until(lambda: state() == 'active', 90), process.output()  # autostart
        for transition_id in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP,
                              Transition.TRANSITION_CONFIGURE):
            assert change(transition_id), process.output()
        time.sleep(3.0)  # time for a launch event handler to activate it (it must not)
        assert state() == 'inactive', process.output()
        result = ros2_cli(['lifecycle', 'set', '--no-daemon', '--spin-time', '3', '/trident', 'activate'], env)
        assert 'Transitioning successful' in result.stdout, (result, process.output())
        assert state() == 'active'
    finally:
        assert process.stop() == 0, process.output()


def test_fake_camera_publishes_given_files_and_refuses_missing_ones(launch_env, tmp_path):
    env, client = launch_env
    images = client.subscribe(Image, '/image', RELIABLE)
    sample = ROOT / 'trident_ros' / 'data' / 'street.png'
    camera = RosProcess(['ros2', 'run', 'trident_ros', 'fake_camera', str(sample), '--ros-args', '-p', 'rate:=5.0',
                         '-p', 'reliability:=reliable', '-p', 'frame_id:=cam2'], env, tmp_path / 'camera.log')
    try:
        msg = images.wait_for(lambda m: m.header.frame_id == 'cam2', 60)
        assert msg is not None, camera.output()
        expected = cv2.cvtColor(cv2.imread(str(sample)), cv2.COLOR_BGR2RGB)
        assert (msg.encoding, msg.width, msg.height, msg.step) == ('rgb8', 640, 480, 1920)
        np.testing.assert_array_equal(np.frombuffer(bytes(msg.data), np.uint8).reshape(480, 640, 3), expected)
    finally:
        assert camera.stop() == 0, camera.output()
    missing = RosProcess(['ros2', 'run', 'trident_ros', 'fake_camera', str(tmp_path / 'nothing.png')], env,
                         tmp_path / 'missing.log')
    assert missing.popen.wait(60) == 1
    missing.stop()
    assert 'cannot read an image from' in missing.output() and 'Traceback' not in missing.output()
