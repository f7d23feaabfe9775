#!/usr/bin/env bash
# The test suite in three legs, each in its own environment (tools/setup.sh all builds them):
#   kilted  the whole suite (test/) on the Kilted wheels (Python 3.11, torch/numpy of requirements/core.txt)
#   jazzy   the ROS tests (test/ros: node, launch, reliability, package, conversions) on the Jazzy wheels (Python 3.12)
#   jetson  the core tests (test/core, no ROS) on the Jetson stack of requirements/jetson.txt (Python 3.10, torch 2.3.1,
#           numpy 1)
# Every leg runs on this run's ROS_DOMAIN_ID (random unless set), DDS discovery kept on this machine. Extra
# arguments go to pytest in every leg; TEST_LEGS="kilted jetson" runs only some. Fails if any leg fails or
# cannot run (it says why); the end prints each leg's pytest summary, and how many tests that need launch_ros
# (a ROS install; PyPI has none) were not run in that leg.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 100 ))}
legs=${TEST_LEGS:-kilted jazzy jetson}
mkdir -p "$root/log"
echo "[test] ROS_DOMAIN_ID=$ROS_DOMAIN_ID legs: $legs"

run_leg() {
  local leg=$1
  shift
  case "$leg" in
    kilted | jazzy)
      local suffix=''
      [ "$leg" = jazzy ] && suffix=-jazzy
      if [ ! -x "$root/.venv$suffix/bin/python" ] || [ ! -f "$root/install$suffix/setup.bash" ]; then
        echo "cannot run: no $leg environment (.venv$suffix, install$suffix): run ROS_DISTRO=$leg make setup"
        return 1
      fi
      local selection=test
      [ "$leg" = jazzy ] && selection=test/ros
      ROS_DISTRO=$leg ROS_LOG_DIR=${ROS_LOG_DIR:-$root/log$suffix/ros} \
        bash "$root/tools/with_env.sh" python -m pytest "$selection" "$@" ;;
    jetson)
      if [ ! -x "$root/.venv-jetson/bin/python" ]; then
        echo "cannot run: no jetson environment (.venv-jetson): run bash tools/setup.sh jetson"
        return 1
      fi
      # The core from the source tree, nothing of ROS on the paths.
      env -u AMENT_PREFIX_PATH -u CMAKE_PREFIX_PATH -u LD_LIBRARY_PATH -u ROS_DISTRO \
        PATH="$root/.venv-jetson/bin:/usr/local/bin:/usr/bin:/bin" VIRTUAL_ENV="$root/.venv-jetson" \
        PYTHONPATH="$root" "$root/.venv-jetson/bin/python" -m pytest test/core "$@" ;;
    *)
      echo "cannot run: unknown leg '$leg' (kilted, jazzy, jetson)"
      return 1 ;;
  esac
}

failed=0
summaries=()
for leg in $legs; do
  echo "[test] ===== leg $leg ====="
  start=$SECONDS
  # pytest exits 5 when it collects no test: that fails the leg, as it should.
  run_leg "$leg" "$@" 2>&1 | tee "$root/log/test-$leg.txt"
  status=${PIPESTATUS[0]}
  summary=$(grep -E '(passed|failed|errors?|no tests ran).* in [0-9.]+s|^cannot run: ' "$root/log/test-$leg.txt" \
            | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  not_run=$(grep -E '^launch tests not run: ' "$root/log/test-$leg.txt" | tail -1)
  summaries+=("[test] $leg: ${summary:-no pytest summary (see log/test-$leg.txt)} -> exit $status, $((SECONDS - start)) s${not_run:+; $not_run}")
  [ "$status" -eq 0 ] || failed=1
done
printf '%s\n' "${summaries[@]}"
exit "$failed"
