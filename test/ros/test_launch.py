"""launch/trident.launch.py and its plan run for real; config/trident.yaml and config/trident.rviz parsed.

The plan (trident_ros.ros.launch_plan) is run everywhere through trident_ros.ros.node_starter, as ``make demo``
runs it; the tests marked ``launch`` run the launch file itself and need launch_ros (a ROS install).
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from lifecycle_msgs.msg import Transition

# ros_helpers first: it checks the ROS 2 environment with a clear message
from ros_helpers import (
    LATCHED,
    RELIABLE,
    ROOT,
    RosProcess,
    TestNode,
    executable,
    fresh_domain_id,
    ros_env,
    wait_until,
)
from sensor_msgs.msg import Image
from trident_ros.msg import VocabularyInfo

from trident_ros import methods
from trident_ros.config import TridentConfig
from trident_ros.ros import node_starter
from trident_ros.ros.launch_plan import arguments, plan_launch
from trident_ros.ros.parameters import NODE_PARAMETERS, OUTPUTS, config_specs
from trident_ros.vocabulary import parse_vocabulary

LAUNCH_FILE = ROOT / 'launch' / 'trident.launch.py'
CONFIG_FILE = ROOT / 'config' / 'trident.yaml'
RVIZ_FILE = ROOT / 'config' / 'trident.rviz'
TINY = {'random_weights': 'true', 'model_scale': 'tiny'}


def load_launch_module():
    spec = importlib.util.spec_from_file_location('trident_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def yaml_parameters() -> dict:
    """The node's parameters in config/trident.yaml by dotted name (nested maps, as ROS 2 reads them)."""
    def flatten(values: dict, prefix: str = '') -> dict:
        flat = {}
        for key, value in values.items():
            flat.update(flatten(value, f'{prefix}{key}.') if isinstance(value, dict) else {f'{prefix}{key}': value})
        return flat
    return flatten(yaml.safe_load(CONFIG_FILE.read_text())['/**/trident']['ros__parameters'])


@pytest.mark.launch
def test_launch_description_declares_the_plans_arguments():
    from launch.actions import DeclareLaunchArgument

    description = load_launch_module().generate_launch_description()
    declared = {a.name: a for a in description.entities if isinstance(a, DeclareLaunchArgument)}
    table = {a.name: a for a in arguments(node_starter.package_share())}
    assert set(declared) == set(table) and len(table) == 13
    for name, argument in table.items():
        assert ''.join(part.text for part in declared[name].default_value) == argument.default, name
        assert declared[name].description.startswith(argument.description), name  # launch may add the choices
        assert declared[name].choices == (list(argument.choices) if argument.choices is not None else None), name
    assert Path(''.join(part.text for part in declared['config_file'].default_value)).is_file()


@pytest.mark.launch
def test_launch_file_turns_the_plan_into_environment_nodes_and_one_autostart(monkeypatch):
    """The plan's environment variables, its nodes in order (the lifecycle one as LifecycleNode), autostart."""
    from launch.actions import EmitEvent, RegisterEventHandler, SetEnvironmentVariable
    from launch_ros.actions import LifecycleNode, Node

    from launch import LaunchContext

    for name in ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE'):
        monkeypatch.delenv(name, raising=False)
    share = node_starter.package_share()
    values = {argument.name: argument.default for argument in arguments(share)} | {'demo': 'true'}
    plan = plan_launch(values, share, {})
    for autostart, handlers in (('true', 1), ('false', 0)):
        context = LaunchContext()
        context.launch_configurations.update(values | {'autostart': autostart})
        actions = load_launch_module()._actions(context, share)
        environment = [(a.name[0].text, a.value[0].text) for a in actions if isinstance(a, SetEnvironmentVariable)]
        assert environment == list(plan.environment.items()) and len(environment) == 2
        nodes = [a for a in actions if isinstance(a, Node)]
        assert [isinstance(n, LifecycleNode) for n in nodes] == [n.lifecycle for n in plan.nodes] == [True, False]
        assert sum(isinstance(a, RegisterEventHandler) for a in actions) == handlers
        assert sum(isinstance(a, EmitEvent) for a in actions) == handlers  # the configure


def test_yaml_has_every_parameter_with_reference_defaults_and_a_comment():
    """Every parameter is in the file with its default; those a method's preset sets are there commented out
    (given, they would be kept for every method), so the file's `method` runs as its authors run it.
    """
    parameters = yaml_parameters()
    preset_names = {name for method in methods.names() for name in methods.get(method).preset}
    assert preset_names and set(parameters) == (set(config_specs()) - preset_names) | set(NODE_PARAMETERS)
    for name in parameters.keys() & config_specs().keys():
        assert parameters[name] == config_specs()[name].default, name
    assert TridentConfig.from_yaml(CONFIG_FILE).flat() == TridentConfig.from_mapping({}).flat()
    naclip = TridentConfig.from_yaml(CONFIG_FILE, {'method': 'naclip'})
    assert naclip.flat() == TridentConfig.from_mapping({'method': 'naclip'}).flat()  # its preset applies
    parse_vocabulary(parameters['vocabulary'])  # the default vocabulary is valid
    lines = CONFIG_FILE.read_text().splitlines()
    for name in sorted(preset_names):
        section, _, leaf = name.rpartition('.')
        start = next(i for i, line in enumerate(lines) if re.match(rf'\s+(# )?{section}:', line))
        default = yaml.safe_dump(config_specs()[name].default).removesuffix('\n...\n').strip()
        assert any(re.match(rf'\s+# {leaf}: {re.escape(default)}\s', line + ' ') for line in lines[start:]), name
    for name in parameters:
        section, _, leaf = name.rpartition('.')
        start = next(i for i, line in enumerate(lines) if re.match(rf'\s+{section}:', line)) if section else 0
        index = next(i for i, line in enumerate(lines) if i > start and re.match(rf'\s+{leaf}:', line))
        commented = '#' in lines[index] or lines[index - 1].strip().startswith('#') or (
            section and '#' in lines[start] + lines[start - 1])
        assert commented, f'{name} has no comment'


def rviz_topics(display_class: str = 'rviz_default_plugins/Image') -> list[str]:
    config = yaml.safe_load(RVIZ_FILE.read_text())
    displays = config['Visualization Manager']['Displays']
    assert {d['Class'] for d in displays} <= {'rviz_default_plugins/Image', 'rviz_default_plugins/PointCloud2'}
    return [d['Topic']['Value'] for d in displays if d['Class'] == display_class]


def test_rviz_config_parses_and_names_the_input_and_node_outputs():
    topics = rviz_topics()
    image_topic = next(a for a in arguments(str(ROOT)) if a.name == 'image_topic')
    assert topics[0] == image_topic.default
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


def assert_demo_runs(client, labels, info, timeout: float, output: Callable[[], str]) -> None:
    """``demo:=true`` is up: the fake camera's 640x480 frames are labelled, the YAML's vocabulary is in use, the
    node's ``image`` is remapped to the camera topic, and every topic the RViz config shows exists.
    """
    found = labels.wait_for(lambda m: m.header.frame_id == 'camera' and (m.width, m.height) == (640, 480), timeout)
    assert found is not None, output()
    yaml_classes = ['; '.join(names) for names in parse_vocabulary(yaml_parameters()['vocabulary']).classes]
    assert info.wait_for(lambda m: list(m.classes) == yaml_classes, 10) is not None  # the YAML is loaded
    subscribers = client.node.get_subscriptions_info_by_topic('/camera/image_raw')
    assert any(s.node_name == 'trident' for s in subscribers)  # `image` remapped to image_topic
    topics = {name for name, _ in client.node.get_topic_names_and_types()}
    assert set(rviz_topics()) <= topics, topics


def test_demo_plan_runs_without_launch_with_the_yaml_remaps_and_stops_on_sigint(launch_env, tmp_path):
    """``demo:=true`` as node_starter runs it (what ``make demo`` uses): node and fake camera, autostarted."""
    env, client = launch_env
    labels = client.subscribe(Image, '/trident/labels')
    info = client.subscribe(VocabularyInfo, '/trident/vocabulary_info', LATCHED)
    plan = plan_launch({'demo': 'true', **TINY}, node_starter.package_share(), env)
    with open(tmp_path / 'nodes.log', 'w', encoding='utf-8') as log:
        processes = node_starter.start(plan, stdout=log, env=env)
    try:
        assert [p.command[0] for p in processes] == [executable('trident_node'), executable('fake_camera')]
        node_starter.autostart(processes, timeout=90)
        assert client.lifecycle_state('/trident') == 'active'
        assert_demo_runs(client, labels, info, 60, lambda: (tmp_path / 'nodes.log').read_text())
        sent = time.monotonic()
        codes = node_starter.stop(processes, timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        node_starter.stop(processes)
    assert codes == [0, 0] and elapsed < 2.0, (codes, elapsed, (tmp_path / 'nodes.log').read_text())


def test_plan_without_autostart_leaves_the_node_unconfigured_with_typed_overrides(launch_env, tmp_path):
    """autostart:=false in a namespace; a vocabulary that looks like a number reaches the node as a string."""
    env, client = launch_env
    plan = plan_launch({'autostart': 'false', 'namespace': 'robot1', 'vocabulary': '7', **TINY},
                       node_starter.package_share(), env)
    with open(tmp_path / 'nodes.log', 'w', encoding='utf-8') as log:
        processes = node_starter.start(plan, stdout=log, env=env)
    try:
        node_starter.autostart(processes, timeout=1)  # nothing to do: returns at once
        client.wait_for_node('/robot1/trident', timeout=60)
        time.sleep(1.0)
        assert client.lifecycle_state('/robot1/trident') == 'unconfigured'
        values = client.get_parameters('/robot1/trident', ['vocabulary', 'models.random_weights', 'models.model_scale'])
        assert values == {'vocabulary': '7', 'models.random_weights': True, 'models.model_scale': 'tiny'}
    finally:
        codes = node_starter.stop(processes)
    assert codes == [0], (tmp_path / 'nodes.log').read_text()


def test_autostart_reports_a_node_that_exits(launch_env, tmp_path):
    """A node that cannot start (an unreadable parameters file) ends autostart with the reason, not a hang."""
    env, _ = launch_env
    plan = plan_launch({'config_file': str(tmp_path / 'missing.yaml'), **TINY}, node_starter.package_share(), env)
    with open(tmp_path / 'nodes.log', 'w', encoding='utf-8') as log:
        processes = node_starter.start(plan, stdout=log, env=env)
    try:
        with pytest.raises(node_starter.StartError, match='trident_node exited'):
            node_starter.autostart(processes, timeout=60)
    finally:
        node_starter.stop(processes)


def test_trident_launch_executable_runs_the_plan_until_sigint(launch_env, tmp_path):
    """``ros2 run trident_ros trident_launch demo:=true ...``: the launch file's nodes for a machine without launch;
    a bad argument is refused with the reason; SIGINT stops the nodes and exits 0.
    """
    env, client = launch_env
    refused = subprocess.run([executable('trident_launch'), 'demo:=maybe'], env=env, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "demo:='maybe' is not one of" in refused.stderr, refused
    labels = client.subscribe(Image, '/trident/labels')
    process = RosProcess([executable('trident_launch'), 'demo:=true', *(f'{k}:={v}' for k, v in TINY.items())], env,
                         tmp_path / 'trident_launch.log')
    try:
        assert labels.wait_for(lambda m: m.header.frame_id == 'camera', 90), process.output()
        assert client.lifecycle_state('/trident') == 'active'
        os.kill(process.popen.pid, signal.SIGINT)  # the command only: it stops the nodes' process groups itself
        code = process.popen.wait(15)
    finally:
        process.stop()
    assert code == 0, process.output()
    assert wait_until(lambda: not client.node.get_subscriptions_info_by_topic('/camera/image_raw'), 10)


@pytest.mark.launch
def test_demo_launch_runs_with_the_yaml_remaps_and_stops_on_sigint(launch_env, tmp_path):
    env, client = launch_env
    labels = client.subscribe(Image, '/trident/labels')
    info = client.subscribe(VocabularyInfo, '/trident/vocabulary_info', LATCHED)
    process = RosProcess(['ros2', 'launch', 'trident_ros', 'trident.launch.py', 'demo:=true',
                          'random_weights:=true', 'model_scale:=tiny'], env, tmp_path / 'launch.log')
    try:
        # autostart: nobody calls a lifecycle service, yet outputs of the fake camera's frames arrive
        assert_demo_runs(client, labels, info, 90, process.output)
        sent = time.monotonic()
        process.signal_group(signal.SIGINT)  # what Ctrl-C in a terminal does
        code = process.popen.wait(10)
        elapsed = time.monotonic() - sent
    finally:
        process.stop()
    assert code == 0 and elapsed < 2.0, (code, elapsed, process.output())
    assert re.search(r'trident_node-\d+\]: process has finished cleanly', process.output()), process.output()


@pytest.mark.launch
def test_autostart_false_leaves_the_node_to_a_lifecycle_manager(launch_env, tmp_path):
    env, client = launch_env
    process = RosProcess(['ros2', 'launch', 'trident_ros', 'trident.launch.py', 'autostart:=false',
                          'random_weights:=true', 'model_scale:=tiny', 'namespace:=robot1'],
                         env, tmp_path / 'launch.log')
    try:
        client.wait_for_node('/robot1/trident', process)
        time.sleep(1.0)
        assert client.lifecycle_state('/robot1/trident') == 'unconfigured'
    finally:
        assert process.stop() == 0, process.output()


@pytest.mark.launch
def test_autostart_happens_once_and_a_later_configure_is_left_to_the_user(launch_env, tmp_path):
    """After deactivate, cleanup, configure the node stays inactive: the user's activate works."""
    env, client = launch_env
    process = RosProcess(['ros2', 'launch', 'trident_ros', 'trident.launch.py', 'random_weights:=true',
                          'model_scale:=tiny'], env, tmp_path / 'launch.log')
    try:
        client.wait_for_node('/trident', process)
        assert wait_until(lambda: client.lifecycle_state('/trident') == 'active', 90), process.output()  # autostart
        for transition_id in (Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_CLEANUP,
                              Transition.TRANSITION_CONFIGURE):
            assert client.change_state('/trident', transition_id), process.output()
        time.sleep(3.0)  # time for a launch event handler to activate it (it must not)
        assert client.lifecycle_state('/trident') == 'inactive', process.output()
        assert client.change_state('/trident', Transition.TRANSITION_ACTIVATE), process.output()
        assert client.lifecycle_state('/trident') == 'active'
    finally:
        assert process.stop() == 0, process.output()


def test_fake_camera_publishes_given_files_and_refuses_missing_ones(launch_env, tmp_path):
    env, client = launch_env
    images = client.subscribe(Image, '/image', RELIABLE)
    sample = ROOT / 'trident_ros' / 'data' / 'street.png'
    camera = RosProcess([executable('fake_camera'), str(sample), '--ros-args', '-p', 'rate:=5.0',
                         '-p', 'reliability:=reliable', '-p', 'frame_id:=cam2'], env, tmp_path / 'camera.log')
    try:
        msg = images.wait_for(lambda m: m.header.frame_id == 'cam2', 60)
        assert msg is not None, camera.output()
        expected = cv2.cvtColor(cv2.imread(str(sample)), cv2.COLOR_BGR2RGB)
        assert (msg.encoding, msg.width, msg.height, msg.step) == ('rgb8', 640, 480, 1920)
        np.testing.assert_array_equal(np.frombuffer(bytes(msg.data), np.uint8).reshape(480, 640, 3), expected)
    finally:
        assert camera.stop() == 0, camera.output()
    missing = RosProcess([executable('fake_camera'), str(tmp_path / 'nothing.png')], env,
                         tmp_path / 'missing.log')
    assert missing.popen.wait(60) == 1
    missing.stop()
    assert 'cannot read an image from' in missing.output() and 'Traceback' not in missing.output()
