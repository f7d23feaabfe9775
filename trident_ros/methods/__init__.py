"""The segmentation methods, one module per family, and the registry the pipeline looks them up in.

In the spirit of timm's ``register_model`` and segment-anything's ``sam_model_registry``: a method is one object
(:class:`~trident_ros.methods.base.Method`) registered under its name. The built-in ones are registered here, slowest
and most accurate first. Another package adds one with :func:`register` at import; naming its module in the
environment variable ``TRIDENT_METHOD_MODULES`` (comma-separated module names) makes every entry point (the node,
``trident-segment``, ``trident-bench``) import it before the first look-up.
"""
from __future__ import annotations

import importlib
import os

from trident_ros.methods.base import Method
from trident_ros.methods.clip_rules import CLIP_RULE_METHODS
from trident_ros.methods.cliptrase import CLIPTRASE
from trident_ros.methods.corrclip import CORRCLIP
from trident_ros.methods.proxy import PROXY
from trident_ros.methods.resclip import RESCLIP, RESCLIP_RCS
from trident_ros.methods.scclip import SCCLIP
from trident_ros.methods.trident import TRIDENT, TRIDENT_FAST

PLUGIN_VARIABLE = 'TRIDENT_METHOD_MODULES'
"""Environment variable: comma-separated modules to import, each registering methods."""

_REGISTRY: dict[str, Method] = {}
_plugins_loaded: set[str] = set()


def register(method: Method) -> Method:
    """Add ``method`` under ``method.name`` (returned, so it can decorate an instance's assignment).

    Raises:
        ValueError: the name is empty or taken by another method, or its section name is another method's with a
            different parameters class.
    """
    if not method.name:
        raise ValueError(f'{type(method).__name__} has no name')
    if _REGISTRY.get(method.name, method) is not method:
        raise ValueError(f'a method named {method.name!r} is already registered')
    if method.section is not None and sections().get(method.section, method.params) is not method.params:
        raise ValueError(f'section {method.section!r} of {method.name!r} belongs to another parameters class')
    _REGISTRY[method.name] = method
    return method


def _load_plugins() -> None:
    """Import the modules named in ``TRIDENT_METHOD_MODULES`` (each once)."""
    for module in filter(None, (name.strip() for name in os.environ.get(PLUGIN_VARIABLE, '').split(','))):
        if module not in _plugins_loaded:
            _plugins_loaded.add(module)
            importlib.import_module(module)


def get(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
        KeyError: no such method (the message lists the registered ones).
    """
    _load_plugins()
    if name not in _REGISTRY:
        raise KeyError(f'unknown method {name!r}: one of {", ".join(_REGISTRY)}')
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Every registered method, in registration order (the built-in ones slowest first)."""
    _load_plugins()
    return tuple(_REGISTRY)


def sections() -> dict[str, type]:
    """Every method parameters section: section name -> its dataclass, in registration order."""
    _load_plugins()
    found: dict[str, type] = {}
    for method in _REGISTRY.values():
        if method.section is not None and method.params is not None:
            found.setdefault(method.section, method.params)
    return found


for _method in (CORRCLIP, TRIDENT, TRIDENT_FAST, PROXY, *CLIP_RULE_METHODS, CLIPTRASE, SCCLIP, RESCLIP, RESCLIP_RCS):
    register(_method)
