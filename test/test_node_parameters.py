"""The node's parameter descriptors: every numeric parameter has a range, defaults lie inside it."""
from __future__ import annotations

import pytest

# ros_helpers first: it checks the ROS 2 environment with a clear message
import ros_helpers  # noqa: F401

from trident_ros.node_parameters import CHOICES, RANGES, descriptor, parameter_defaults

pytestmark = pytest.mark.ros


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
