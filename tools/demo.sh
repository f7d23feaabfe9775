#!/usr/bin/env bash
# The README's main command (after set-up): the node on the bundled sample images.
# Extra arguments go to `python -m trident_ros.tools.demo` (e.g. --random-weights, --vocabulary '...').
# No ROS install or `launch` needed: the demo starts the node's executable and drives its lifecycle itself.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
set +u; . "$root/tools/env.sh"; set -u
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 100 ))}
exec python -m trident_ros.tools.demo "$@"
