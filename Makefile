# Two commands for a new user (see README.md):
#   make demo   set up (venv + colcon build), then run the node on bundled sample images
#   make test   set up, then run the test suite
.PHONY: setup demo test bench
setup:
	bash tools/setup.sh
demo: setup
	bash tools/demo.sh $(ARGS)
test: setup
	bash tools/test.sh $(ARGS)
bench: setup
	bash tools/with_env.sh python -m trident_ros.bench $(ARGS)
