"""Package foundation: interfaces built by colcon, importable next to the hand-written modules,
exchanged over real DDS; the core importable without ROS; package.xml/rosdep consistent.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ROS_SIDE = ('ros', 'tools.demo')
"""The ROS adapter and the ROS-side tool; everything else is core (``ros.launch_plan`` and ``ros.depth_pairing``
import no ROS but belong to the adapter)."""
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
    return sorted(name for name in names if not any(name == side or name.startswith(side + '.') for side in ROS_SIDE))


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
