#!/usr/bin/env bash
# One-command set-up for machines without a ROS install. Usage: tools/setup.sh [kilted|jazzy|jetson|all]
# (default: $ROS_DISTRO, as a sourced ROS install sets it, else kilted).
#   kilted, jazzy  a venv with the pinned PyTorch stack and that distro's ROS 2 PyPI wheels (plus the launch/ros2cli
#                  and vision_msgs/message_filters/sensor_msgs_py wheels of ../shared/wheels when there), then
#                  `colcon build` of this package into ./install (kilted) or ./install-jazzy (build-jazzy, log-jazzy).
#   jetson         a venv of the core only (no ROS) on the Jetson stack: requirements/jetson.txt on Python 3.10.
#   all            the three.
# Idempotent: re-running it with nothing changed skips pip and lets colcon do a no-op build (seconds).
#
# The venvs live outside the source tree (CMake refuses exported include dirs inside it), keyed by the hash of
# their inputs, so clones share them and a change of requirements makes a new one. Each is linked from the
# clone: .venv (kilted), .venv-jazzy, .venv-jetson.
# Environment: TRIDENT_VENV (a fixed venv path instead), PYTHON (ROS venvs; default python3.11, else python3),
# PYTHON_JETSON (default: python3.10, else pyenv's 3.10).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
target=${1:-${ROS_DISTRO:-kilted}}
case "$target" in
  all)
    for each in kilted jazzy jetson; do TRIDENT_VENV='' bash "$root/tools/setup.sh" "$each"; done
    exit 0 ;;
  kilted | jazzy | jetson) ;;
  *)
    echo "[setup] unknown distro '$target' (argument or ROS_DISTRO): this set-up knows kilted and jazzy" \
         "(ROS 2 PyPI wheels), jetson (core only) and all. On a ROS install of your own (e.g. Humble)," \
         "build with colcon as README.md says." >&2
    exit 2 ;;
esac
cache=${XDG_CACHE_HOME:-$HOME/.cache}/trident_ros
wheels=$root/../shared/wheels

if [ "$target" = jetson ]; then
  python=${PYTHON_JETSON:-}
  if [ -z "$python" ]; then
    for candidate in python3.10 "$HOME"/.pyenv/versions/3.10*/bin/python3.10; do
      if "$candidate" --version >/dev/null 2>&1; then python=$candidate; break; fi
    done
  fi
  [ -n "$python" ] || { echo "[setup] jetson: no Python 3.10 found (set PYTHON_JETSON)" >&2; exit 1; }
  stamp=$({ "$python" --version; cat requirements/jetson.txt; } 2>&1 | sha256sum | cut -d' ' -f1)
  venv=${TRIDENT_VENV:-$cache/venv-jetson-${stamp:0:12}}
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.trident-setup-stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "[setup] jetson: creating/updating the venv at $venv (first time: torch 2.3.1 + CUDA wheels, GBs)"
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade "pip>=24" "setuptools<80" wheel
    "$venv/bin/pip" install -q -r requirements/jetson.txt
    echo "$stamp" > "$venv/.trident-setup-stamp"
  else
    echo "[setup] jetson: venv up to date: $venv"
  fi
  ln -sfn "$venv" "$root/.venv-jetson"
  echo "[setup] jetson: core venv $venv (linked as .venv-jetson); run the core from the source tree with it"
  exit 0
fi

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ "$target" = kilted ]; then
  requirements=(requirements/core.txt requirements/ros.txt requirements/test.txt)
  launch_wheels=$wheels/ros2-launch
  extra_wheels=$wheels/ros2-extra
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
  venv_name=venv suffix=''
else
  # The ros-jazzy-* names throughout: an unprefixed ros-<pkg> would resolve to its Kilted release.
  requirements=(requirements/core.txt requirements/ros-jazzy.txt requirements/test.txt)
  launch_wheels=$wheels/ros2-launch-jazzy
  extra_wheels=$wheels/ros2-extra-jazzy
  launch_pins=(
    launch==3.4.3 launch_xml==3.4.3 launch_yaml==3.4.3 launch_testing==3.4.3
    launch_ros==0.26.6 launch_testing_ros==0.26.6 ros2launch==0.26.6
    ros2cli==0.32.2 ros2topic==0.32.2 ros2node==0.32.2 ros2param==0.32.2 ros2pkg==0.32.2
    ros2service==0.32.2 ros2interface==0.32.2 ros2run==0.32.2 ros2lifecycle==0.32.2
    rosidl_runtime_py==0.13.1 ament_copyright==0.17.1 ros-composition-interfaces==2.0.2 ros-jazzy-ament-lint==0.17.3
    osrf-pycommon packaging argcomplete
  )
  extra_pins=(ros-jazzy-vision-msgs==4.1.1 message_filters==4.11.2 sensor_msgs_py==5.3.5)
  venv_name=venv-jazzy suffix=-jazzy
fi

stamp_of_inputs() {
  {
    "$python" --version
    cat "${requirements[@]}"
    echo "${launch_pins[*]} ${extra_pins[*]}"
    [ -d "$launch_wheels" ] && ls "$launch_wheels"
    [ -d "$extra_wheels" ] && ls "$extra_wheels"
  } 2>&1 | sha256sum | cut -d' ' -f1
}

stamp=$(stamp_of_inputs)
venv=${TRIDENT_VENV:-$cache/$venv_name-${stamp:0:12}}
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.trident-setup-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] $target: creating/updating the venv at $venv (first time: a few minutes)"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade "pip>=24" "setuptools<80" wheel
  "$venv/bin/pip" install -q "${requirements[@]/#/-r}"
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
  echo "[setup] $target: venv up to date: $venv"
fi

# Build msg/ + the package the way ROS users do (colcon), against the wheels in the venv.
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv"
log=$root/log$suffix
mkdir -p "$log"
colcon --log-base "$log" build --paths "$root" --build-base "$root/build$suffix" \
  --install-base "$root/install$suffix" \
  --symlink-install --event-handlers console_direct- summary- \
  --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$venv/bin/python" >"$log/colcon-build.txt" 2>&1 \
  || { cat "$log/colcon-build.txt"; echo "[setup] colcon build failed" >&2; exit 1; }
ln -sfn "$venv" "$root/.venv$suffix"
echo "[setup] $target: built $root/install$suffix; venv: $venv (linked as .venv$suffix);" \
     "${suffix:+ROS_DISTRO=$target }source tools/env.sh to use them"
