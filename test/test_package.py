"""Package foundation: interfaces built by colcon, importable next to the hand-written modules,
exchanged over real DDS; the core importable without ROS; package.xml/rosdep consistent.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROS_ONLY_MODULES = {'node', 'node_main', 'ros_compat', 'node_health', 'node_parameters', 'frame_io',
                    'vocabulary_topics', 'conversions', 'depth_io', 'fake_camera', 'demo', 'node_starter'}
ROS_PACKAGES = ('rclpy', 'rosidl_runtime_py', 'rosidl_parser', 'sensor_msgs', 'std_msgs', 'builtin_interfaces',
                'diagnostic_msgs', 'lifecycle_msgs', 'cv_bridge', 'rosbags', 'launch', 'launch_ros', 'geometry_msgs',
                'vision_msgs', 'message_filters', 'sensor_msgs_py')


def run_python(code: str, cwd: Path | str = ROOT, timeout: float = 120, env: dict | None = None):
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def core_module_names() -> list[str]:
    """Dotted names below ``trident_ros`` (e.g. ``models.sam``) of every core module, packages included."""
    package = ROOT / 'trident_ros'
    names = {'.'.join(p.relative_to(package).with_suffix('').parts) for p in package.rglob('*.py')}
    names = {name.removesuffix('.__init__') for name in names if name != '__init__'}
    return sorted(name for name in names if name.split('.')[0] not in ROS_ONLY_MODULES)


def test_core_imports_without_ros():
    """Every core module imports in a process where all ROS modules are unavailable."""
    modules = core_module_names()
    assert {'config', 'pipeline', 'models', 'models.sam'} <= set(modules)
    result = run_python(f'''
        import importlib, sys
        blocked = {ROS_PACKAGES!r}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in blocked or name == 'trident_ros.msg':
                    raise ImportError('ROS is not available here: ' + name)
        sys.meta_path.insert(0, Block())
        for name in {modules!r}:
            importlib.import_module('trident_ros.' + name)
        loaded = sorted(m for m in sys.modules if m.split('.')[0] in blocked)
        assert not loaded, loaded
        print('ok', len({modules!r}))
    ''')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('ok')


@pytest.mark.ros
def test_generated_msgs_and_modules_import_from_one_prefix(tmp_path):
    """From outside the source tree, trident_ros.msg and the hand-written modules both come from
    the colcon install prefix (rosidl's generated package and ours are one package).
    """
    result = run_python('''
        import trident_ros, trident_ros.config, trident_ros.msg
        from trident_ros.msg import ClassMask, ClassMaskArray, VocabularyInfo
        print(trident_ros.msg.__file__)
        print(trident_ros.config.__file__)
        print(trident_ros.__file__)
    ''', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    msg_file, config_file, init_file = (Path(line) for line in result.stdout.split())
    from ament_index_python.packages import get_package_prefix

    prefix = Path(get_package_prefix('trident_ros'))  # this environment's build: install/ (kilted), install-jazzy/
    assert prefix.parent.parent == ROOT and prefix.parent.name.startswith('install'), prefix
    for path in (msg_file, config_file, init_file):
        assert prefix in path.parents, path
    assert msg_file.parent.parent == config_file.parent == init_file.parent


@pytest.mark.ros
def test_class_mask_array_between_two_processes(tmp_path):
    """A publisher and a subscriber process exchange one ClassMaskArray over real DDS."""
    subscriber = tmp_path / 'sub.py'
    subscriber.write_text(textwrap.dedent('''
        import sys, time
        import rclpy
        from rclpy.qos import QoSProfile, ReliabilityPolicy, DurabilityPolicy
        from trident_ros.msg import ClassMaskArray
        rclpy.init()
        node = rclpy.create_node('mask_sub')
        got = []
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(ClassMaskArray, '/test/masks', got.append, qos)
        end = time.time() + 60
        while not got and time.time() < end:
            rclpy.spin_once(node, timeout_sec=0.1)
        m = got[0]
        print(m.header.frame_id, list(m.vocabulary), m.masks[0].label, m.masks[0].class_id,
              m.masks[0].area, m.masks[0].bbox.width, m.masks[0].mask.encoding, bytes(m.masks[0].mask.data).hex())
    '''))
    publisher = tmp_path / 'pub.py'
    publisher.write_text(textwrap.dedent('''
        import time
        import rclpy
        from rclpy.qos import QoSProfile, ReliabilityPolicy, DurabilityPolicy
        from sensor_msgs.msg import Image, RegionOfInterest
        from trident_ros.msg import ClassMask, ClassMaskArray
        rclpy.init()
        node = rclpy.create_node('mask_pub')
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        pub = node.create_publisher(ClassMaskArray, '/test/masks', qos)
        msg = ClassMaskArray()
        msg.header.frame_id = 'camera'
        msg.vocabulary = ['door', 'sofa; couch']
        mask = Image(height=1, width=2, encoding='mono8', step=2, data=bytes([255, 0]))
        msg.masks = [ClassMask(label='door', class_id=1, score=0.5, area=1,
                               bbox=RegionOfInterest(x_offset=3, y_offset=4, width=2, height=1), mask=mask)]
        pub.publish(msg)
        end = time.time() + 60
        while pub.get_subscription_count() == 0 and time.time() < end:
            rclpy.spin_once(node, timeout_sec=0.1)
        time.sleep(2.0)
    '''))
    sub = subprocess.Popen([sys.executable, str(subscriber)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    pub = subprocess.Popen([sys.executable, str(publisher)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = sub.communicate(timeout=90)
    finally:
        pub.kill()
        sub.kill()
    assert sub.returncode == 0, err
    assert out.split() == ['camera', "['door',", "'sofa;", "couch']", 'door', '1', '1', '2', 'mono8', 'ff00']


@pytest.mark.ros
def test_colcon_build_from_scratch(tmp_path):
    """The path ROS users take: `colcon build` of a clean copy of the package against the same
    ROS prefix installs the interfaces, the Python package, executables, launch and config files.
    """
    if shutil.which('colcon') is None:
        pytest.skip('colcon is not installed in this environment')
    src = tmp_path / 'src' / 'trident_ros'
    ignored = shutil.ignore_patterns('build', 'install', 'log', '.venv', '.git', '__pycache__', '*.egg-info')
    shutil.copytree(ROOT, src, ignore=ignored)
    result = subprocess.run(
        ['colcon', 'build', '--base-paths', str(tmp_path / 'src'), '--build-base', str(tmp_path / 'build'),
         '--install-base', str(tmp_path / 'install'), '--event-handlers', 'console_direct-',
         '--cmake-args', '-DBUILD_TESTING=OFF', f'-DPython3_EXECUTABLE={sys.executable}'],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prefix = tmp_path / 'install' / 'trident_ros'
    site = next(prefix.glob('lib/python3*/site-packages/trident_ros'))
    assert (site / 'msg' / '_class_mask_array.py').is_file()
    assert (site / 'pipeline.py').is_file() and (site / 'node.py').is_file()
    assert 'extend_path' in (site / '__init__.py').read_text()  # ours, not rosidl's empty one
    for executable in ('trident_node', 'fake_camera'):
        assert os.access(prefix / 'lib' / 'trident_ros' / executable, os.X_OK)
    assert (prefix / 'share' / 'trident_ros' / 'launch' / 'trident.launch.py').is_file()
    assert (prefix / 'share' / 'trident_ros' / 'config' / 'trident.yaml').is_file()


def test_package_xml_declares_runtime_dependencies():
    root = ET.parse(ROOT / 'package.xml').getroot()
    assert root.get('format') == '3'
    assert root.findtext('name') == 'trident_ros'
    depends = {e.text for e in root if e.tag in ('depend', 'exec_depend')}
    required = {'rclpy', 'sensor_msgs', 'std_msgs', 'diagnostic_msgs', 'cv_bridge', 'python3-numpy',
                'python3-opencv', 'lifecycle_msgs', 'rosidl_default_runtime', 'geometry_msgs', 'vision_msgs'}
    assert required <= depends, required - depends
    pip_keys = {d for d in depends if d.endswith('-pip')}
    assert {'python3-torch-pip', 'python3-timm-pip', 'python3-open-clip-torch-pip',
            'python3-segment-anything-pip'} <= pip_keys
    rosdep = yaml.safe_load((ROOT / 'rosdep.yaml').read_text())
    assert pip_keys <= set(rosdep), pip_keys - set(rosdep)
    assert root.find('export/build_type').text == 'ament_cmake'
