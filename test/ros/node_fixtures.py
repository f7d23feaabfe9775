"""test_node's fixtures as a pytest plugin, for the ROS test modules that run a node of their own.

A module names it in ``pytest_plugins`` and requests the fixtures by name: ``domain``, ``env``, ``client``,
``outputs`` and ``cameras`` are module-scoped (each module gets its own), ``active`` runs on the requesting
module's ``trident`` fixture.
"""
from test_node import active, cameras, client, domain, env, outputs

__all__ = ['active', 'cameras', 'client', 'domain', 'env', 'outputs']
