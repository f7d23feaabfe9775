#!/usr/bin/env bash
# The test suite, in the project's environment, on its own ROS_DOMAIN_ID (random per run unless set),
# DDS discovery kept on this machine. Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck disable=SC1091
set +u; . "$root/tools/env.sh"; set -u
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 100 ))}
export ROS_LOG_DIR=${ROS_LOG_DIR:-$root/log/ros}
cd "$root"
echo "[test] ROS_DOMAIN_ID=$ROS_DOMAIN_ID"
# pytest exits 5 when it collects no test: that fails this script, as it should.
exec python -m pytest test "$@"
