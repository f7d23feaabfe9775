"""One configuration: what the node runs is what its parameters show, and what the CLI runs from the same YAML.

In-process node (tiny random-weight models, no DDS traffic), one for the module, configured once per method.
"""
from __future__ import annotations

import pytest

# ros_helpers first: it checks the ROS 2 environment with a clear message
import ros_helpers
import yaml
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

from trident_ros import methods
from trident_ros.ros.parameters import config_specs
from trident_ros.tools import segment

SUCCESS = TransitionCallbackReturn.SUCCESS


@pytest.fixture(scope='module')
def params_file(tmp_path_factory):
    """The shipped config/trident.yaml with tiny random-weight models and ``labelling.prob_thd`` given at its
    default (kept, though naclip's preset says 0.0); its ``depth`` section is the node's own (the CLI skips it).
    """
    shipped = yaml.safe_load((ros_helpers.ROOT / 'config' / 'trident.yaml').read_text())
    [parameters] = [node['ros__parameters'] for node in shipped.values()]
    parameters['models'].update(random_weights=True, model_scale='tiny', device='cpu')
    parameters['labelling']['prob_thd'] = 0.2
    path = tmp_path_factory.mktemp('config') / 'params.yaml'
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': parameters}}))
    return path


@pytest.fixture(scope='module')
def node(params_file):
    with ros_helpers.in_process_node(args=['--ros-args', '--params-file', str(params_file)]) as trident:
        yield trident


def parameters(node) -> dict:
    return {param.name: param.value for param in node.get_parameters(list(config_specs()))}


def cli_config(params_file, method: str, capsys) -> dict:
    """``trident-segment --config <file> --method <method> --print-config``, parsed."""
    capsys.readouterr()
    assert segment.main(['--config', str(params_file), '--method', method, '--print-config']) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_parameters_after_configure_are_the_pipeline_config_and_the_cli_config_for_every_method(
        node, params_file, capsys):
    for method in methods.names():
        assert node.set_parameters([Parameter('method', value=method)])[0].successful
        assert node.trigger_configure() == SUCCESS, method
        try:
            shown, running = parameters(node), node.running_config.flat()
            assert shown == running, (method, {k: (v, running[k]) for k, v in shown.items() if running[k] != v})
            assert shown == cli_config(params_file, method, capsys), method
            assert shown['labelling.prob_thd'] == 0.2 and shown['models.model_scale'] == 'tiny'
        finally:
            assert node.trigger_cleanup() == SUCCESS


def test_a_method_change_takes_effect_at_the_next_configure_whole(node):
    assert node.set_parameters([Parameter('method', value='trident')])[0].successful
    assert node.trigger_configure() == SUCCESS
    try:
        assert node.running_config.labelling.pamr is False
        assert node.set_parameters([Parameter('method', value='naclip')])[0].successful  # at the next configure
        assert node.set_parameters([Parameter('labelling.logit_scale', value=50.0)])[0].successful  # at once
        running = node.running_config
        assert running.method == 'trident' and running.labelling.logit_scale == 50.0
        assert (running.labelling.pamr, running.windows.input_short_side) == (False, 448)  # no naclip preset leak
        assert parameters(node)['windows.input_short_side'] == 448
        before = node.running_config
        assert node.set_parameters([Parameter('depth.scale', value=0.002)])[0].successful  # depth I/O only
        assert node.running_config is before
    finally:
        assert node.trigger_cleanup() == SUCCESS
    assert node.trigger_configure() == SUCCESS
    try:
        running = node.running_config.flat()
        assert running['method'] == 'naclip' and running['labelling.pamr'] is True  # naclip's preset, whole
        assert running['windows.input_short_side'] == 336
        assert running['labelling.logit_scale'] == 50.0 and running['labelling.prob_thd'] == 0.2  # given: kept
        assert parameters(node) == running
    finally:
        assert node.trigger_cleanup() == SUCCESS
