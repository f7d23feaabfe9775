#!/usr/bin/env bash
# Run a command inside the project's environment (venv + ROS wheels + colcon install + DDS profile).
set -euo pipefail
# shellcheck disable=SC1091
set +u; . "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/env.sh"; set -u
exec "$@"
