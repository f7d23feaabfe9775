"""The ROS side of test_fetch_weights.py: tests that need the colcon install and rclpy."""

from __future__ import annotations

import subprocess

# ros_helpers first: it checks the ROS 2 environment with a clear message
from ros_helpers import executable

from trident_ros.models.weights import (
    SAM_CHECKPOINTS,
)


def test_installed_fetch_weights_prints_the_list(tmp_path):
    """The installed executable (``ros2 run trident_ros fetch_weights --print`` runs it)."""
    result = subprocess.run([executable('fetch_weights'), '--print', '--weights-dir', str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert SAM_CHECKPOINTS['vit_b'].url in result.stdout and str(tmp_path / 'sam_vit_b_01ec64.pth') in result.stdout
