# Source this (bash) after tools/setup.sh: the venv, the ROS 2 wheels' prefix, this package's colcon
# install, and DDS settings that keep traffic on this machine and let camera-sized messages through.
# Everything set here can be overridden by exporting it before sourcing.
# ROS_DISTRO (default kilted; jazzy: the venv and colcon install of `ROS_DISTRO=jazzy tools/setup.sh`).
_trident_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${ROS_DISTRO:-kilted}" in
  kilted) _trident_suffix='' ;;
  jazzy) _trident_suffix=-jazzy ;;
  *) echo "tools/env.sh: ROS_DISTRO=$ROS_DISTRO: the project's environments are kilted and jazzy" >&2
     unset _trident_root; return 1 ;;
esac
export ROS_DISTRO=${ROS_DISTRO:-kilted}
_trident_venv=${TRIDENT_VENV:-$_trident_root/.venv$_trident_suffix}
export VIRTUAL_ENV="$_trident_venv"
export PATH="$_trident_venv/bin:$PATH"
export AMENT_PREFIX_PATH="${AMENT_PREFIX_PATH:+$AMENT_PREFIX_PATH:}$_trident_venv"
export CMAKE_PREFIX_PATH="${CMAKE_PREFIX_PATH:+$CMAKE_PREFIX_PATH:}$_trident_venv"
if [ -f "$_trident_root/install$_trident_suffix/setup.bash" ]; then
  # shellcheck disable=SC1091
  COLCON_CURRENT_PREFIX="$_trident_root/install$_trident_suffix" . "$_trident_root/install$_trident_suffix/setup.bash"
  # no `ros2 run` without a ROS install: the package's executables (trident_node, trident_launch, ...) on PATH, last
  export PATH="$PATH:$_trident_root/install$_trident_suffix/trident_ros/lib/trident_ros"
fi
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
# Fast DDS 3.x (Kilted) reads FASTDDS_..., 2.x (Jazzy, Humble) FASTRTPS_...: a profile set under either name is
# used under both, the package's large-data profile when neither is set.
_trident_profile=${FASTDDS_DEFAULT_PROFILES_FILE:-${FASTRTPS_DEFAULT_PROFILES_FILE:-$_trident_root/config/fastdds_large_data.xml}}
export FASTDDS_DEFAULT_PROFILES_FILE=${FASTDDS_DEFAULT_PROFILES_FILE:-$_trident_profile}
export FASTRTPS_DEFAULT_PROFILES_FILE=${FASTRTPS_DEFAULT_PROFILES_FILE:-$_trident_profile}
export RMW_IMPLEMENTATION=${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}
unset _trident_root _trident_venv _trident_profile _trident_suffix
