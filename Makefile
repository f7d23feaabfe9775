# Two commands for a new user (see README.md):
#   make demo   set up (venv + colcon build), then run the node on bundled sample images
#   make test   set up all three environments, then run the test suite's three legs (kilted, jazzy, jetson)
# ROS_DISTRO=jazzy make setup|demo|bench uses the Jazzy environment (default: kilted).
.PHONY: setup setup-all demo test bench
setup:
	bash tools/setup.sh
setup-all:
	bash tools/setup.sh all
demo: setup
	bash tools/demo.sh $(ARGS)
test: setup-all
	bash tools/test.sh $(ARGS)
bench: setup
	bash tools/with_env.sh python -m trident_ros.tools.bench $(ARGS)
