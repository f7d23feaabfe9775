"""tools/setup.sh, tools/env.sh and tools/test.sh: distro selection and the Fast DDS profile variables."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROFILE = str(ROOT / 'config' / 'fastdds_large_data.xml')


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ('ROS_DISTRO', 'FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE')}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env={**clean, **env})


def environment_of(**env: str) -> dict[str, str]:
    result = run(['bash', 'tools/with_env.sh', 'env'], **env)
    assert result.returncode == 0, result.stderr
    return dict(line.split('=', 1) for line in result.stdout.splitlines() if '=' in line)


def test_setup_refuses_an_unknown_distro_before_doing_anything():
    result = run(['bash', 'tools/setup.sh'], ROS_DISTRO='humble')
    assert result.returncode == 2
    assert "unknown distro 'humble'" in result.stderr and 'kilted' in result.stderr and 'jazzy' in result.stderr
    assert run(['bash', 'tools/setup.sh', 'rolling']).returncode == 2


def test_env_uses_the_distros_venv_and_install_and_refuses_others():
    kilted = environment_of()
    assert kilted['ROS_DISTRO'] == 'kilted' and kilted['VIRTUAL_ENV'] == str(ROOT / '.venv')
    jazzy = environment_of(ROS_DISTRO='jazzy')
    assert jazzy['VIRTUAL_ENV'] == str(ROOT / '.venv-jazzy')
    assert jazzy['PATH'].startswith(str(ROOT / '.venv-jazzy' / 'bin') + os.pathsep)
    result = run(['bash', 'tools/with_env.sh', 'true'], ROS_DISTRO='humble')
    assert result.returncode != 0 and 'ROS_DISTRO=humble' in result.stderr


def test_both_fast_dds_profile_variables_get_one_profile():
    """Both are set: to the user's profile under either name, else to the package's.

    Fast DDS 3.x (Kilted) reads FASTDDS_..., 2.x (Jazzy, Humble) FASTRTPS_...
    """
    default = environment_of()
    assert default['FASTDDS_DEFAULT_PROFILES_FILE'] == default['FASTRTPS_DEFAULT_PROFILES_FILE'] == PROFILE
    for name in ('FASTDDS_DEFAULT_PROFILES_FILE', 'FASTRTPS_DEFAULT_PROFILES_FILE'):
        own = environment_of(**{name: '/users/own.xml'})
        assert own['FASTDDS_DEFAULT_PROFILES_FILE'] == own['FASTRTPS_DEFAULT_PROFILES_FILE'] == '/users/own.xml'


def test_a_leg_that_cannot_run_says_why_and_fails():
    result = run(['bash', 'tools/test.sh'], TEST_LEGS='humble')
    assert result.returncode == 1
    assert "cannot run: unknown leg 'humble'" in result.stdout
    assert '[test] humble: cannot run' in result.stdout
