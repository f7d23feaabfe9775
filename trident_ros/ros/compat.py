"""The rclpy APIs the node uses that differ between ROS 2 Humble (rclpy 3.3) and Jazzy/Kilted (rclpy >= 7).

* ``SubscriptionEventCallbacks``: in ``rclpy.event_handler`` since Iron, in ``rclpy.qos_event`` on Humble.
* Parameter callbacks: since Iron a node has pre-set (may rewrite the list), on-set (accepts or refuses)
  and post-set (runs after the values are stored) callbacks; Humble has only on-set callbacks, which
  run before the values are stored. :func:`add_parameter_callbacks` registers the three where they
  exist and, on Humble, one on-set callback that validates and then applies.
"""
from __future__ import annotations

from collections.abc import Callable

from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble: the same class under its older module name
    from rclpy.qos_event import SubscriptionEventCallbacks

__all__ = ['PRE_POST_SET_CALLBACKS', 'SubscriptionEventCallbacks', 'add_parameter_callbacks']

PRE_POST_SET_CALLBACKS = hasattr(Node, 'add_post_set_parameters_callback')
"""Whether this rclpy has pre-set and post-set parameter callbacks (Iron and later; not Humble)."""


def add_parameter_callbacks(node: Node, coerce: Callable[[list[Parameter]], list[Parameter]],
                            validate: Callable[[list[Parameter]], SetParametersResult],
                            apply: Callable[[list[Parameter]], None],
                            pre_post: bool = PRE_POST_SET_CALLBACKS) -> None:
    """Register the node's parameter callbacks: coerce, then validate, then apply.

    Args:
        node: the node.
        coerce: rewrites the parameters about to be set (e.g. an integer for a float parameter).
        validate: accepts or refuses the parameters with a reason; must not act on them.
        apply: acts on parameters that were accepted.
        pre_post: register ``coerce`` as a pre-set and ``apply`` as a post-set callback (rclpy >= Iron).
            False (what Humble has): one on-set callback that runs ``validate`` and, if it accepts,
            ``apply``; ``coerce`` is not used (rclpy refuses an integer for a float parameter with
            "Wrong parameter type"), and ``apply`` runs before rclpy stores the values, so it must take
            them from the list it is given, not from ``node.get_parameter``.
    """
    if pre_post:
        node.add_pre_set_parameters_callback(coerce)
        node.add_on_set_parameters_callback(validate)
        node.add_post_set_parameters_callback(apply)
        return

    def validate_then_apply(parameters: list[Parameter]) -> SetParametersResult:
        result = validate(parameters)
        if result.successful:
            apply(parameters)
        return result

    node.add_on_set_parameters_callback(validate_then_apply)
