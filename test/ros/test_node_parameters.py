"""The node's parameter descriptors: every numeric parameter has a range, defaults lie inside it."""
from __future__ import annotations

# ros_helpers first: it checks the ROS 2 environment with a clear message
import ros_helpers

from trident_ros.ros.parameters import CHOICES, RANGES, config_from_values, descriptor, parameter_defaults


def test_every_numeric_parameter_has_a_range_holding_its_default():
    for name, (default, description) in parameter_defaults().items():
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        assert name in RANGES, f'{name} has no range'
        result = descriptor(name, description)
        [limits] = result.integer_range if isinstance(default, int) else result.floating_point_range
        assert limits.from_value <= default <= limits.to_value, name
        assert not limits.step or (default - limits.from_value) % limits.step == 0, name


def test_choices_are_stated_and_include_the_default():
    defaults = parameter_defaults()
    for name, choices in CHOICES.items():
        assert defaults[name][0] in choices, name
        assert descriptor(name, '').additional_constraints == f'one of: {", ".join(choices)}'


def test_an_invalid_qos_override_fails_activate_cleanly():
    """In-process node: ``reliability: bogus`` for an output makes activate FAIL, the node stays inactive."""
    from rclpy.lifecycle import TransitionCallbackReturn

    with ros_helpers.in_process_node({'qos_overrides./trident/labels.publisher.reliability': 'bogus'}) as node:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_activate() == TransitionCallbackReturn.FAILURE
        status = node.diagnostic_status()
        assert 'activate failed' in status.message
        assert {kv.key: kv.value for kv in status.values}['lifecycle_state'] == 'inactive'


def test_an_out_of_range_start_value_is_kept_out_and_configure_says_why():
    """``-p labelling.prob_thd:=2.0``: the process starts (default kept), configure FAILS naming the parameter."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    with ros_helpers.in_process_node({'labelling.prob_thd': 2.0}) as node:
        assert node.get_parameter('labelling.prob_thd').value == 0.2
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert 'labelling.prob_thd' in node.diagnostic_status().message
        assert node.set_parameters([Parameter('labelling.prob_thd', value=0.3)])[0].successful  # set again: fine
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS


def test_a_method_preset_applies_to_the_names_not_given_and_given_values_win_even_at_their_default():
    values = {name: default for name, (default, _) in parameter_defaults().items()}
    naclip = config_from_values({**values, 'method': 'naclip'}, {'method'}).flat()
    assert (naclip['labelling.pamr'], naclip['windows.input_short_side']) == (True, 336)  # NACLIP's own settings
    mine = config_from_values({**values, 'method': 'naclip', 'windows.input_short_side': 448},
                              {'method', 'windows.input_short_side'}).flat()
    assert (mine['labelling.pamr'], mine['windows.input_short_side']) == (True, 448)  # the default, given: kept
    trident = config_from_values(values, set()).flat()
    assert (trident['labelling.pamr'], trident['windows.input_short_side']) == (False, 448)
