"""The ROS side of test_package.py: tests that need the colcon install and rclpy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, cwd: Path | str = ROOT, timeout: float = 120, env: dict | None = None):
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


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


def test_colcon_build_from_scratch(tmp_path):
    """The path ROS users take: `colcon build` of a clean copy of the package against the same
    ROS prefix installs the interfaces, the Python package, executables, launch and config files.
    """
    if shutil.which('colcon') is None:
        pytest.skip('colcon is not installed in this environment')
    src = tmp_path / 'src' / 'trident_ros'
    # every leg's build, install and log folders and venv links (a stale symlink there breaks the copy)
    ignored = shutil.ignore_patterns(*(f'{name}{leg}' for name in ('build', 'install', 'log', '.venv')
                                       for leg in ('', '-jazzy', '-jetson')), '.git', '__pycache__', '*.egg-info')
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
    assert (site / 'pipeline.py').is_file() and (site / 'ros' / 'node.py').is_file() and (site / 'methods').is_dir()
    assert 'extend_path' in (site / '__init__.py').read_text()  # ours, not rosidl's empty one
    for executable in ('trident_node', 'fake_camera', 'export_models', 'fetch_weights'):
        assert os.access(prefix / 'lib' / 'trident_ros' / executable, os.X_OK)
    assert (prefix / 'share' / 'trident_ros' / 'launch' / 'trident.launch.py').is_file()
    assert (prefix / 'share' / 'trident_ros' / 'config' / 'trident.yaml').is_file()
