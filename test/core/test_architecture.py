"""The layering of ``trident_ros``, read from the source with ``ast`` and held against the module map of
``docs/architecture.md`` (its "may import" column is the rule): every module has a row, imports only what
its row allows, ROS only where its row says so; no import cycles, no oversized files.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / 'trident_ros'
ARCHITECTURE = ROOT / 'docs' / 'architecture.md'
ROS_PACKAGES = {'rclpy', 'rosidl_runtime_py', 'rosidl_parser', 'sensor_msgs', 'std_msgs', 'builtin_interfaces',
                'diagnostic_msgs', 'lifecycle_msgs', 'rcl_interfaces', 'vision_msgs', 'message_filters',
                'sensor_msgs_py', 'geometry_msgs', 'cv_bridge', 'launch', 'launch_ros', 'ament_index_python'}
"""ROS packages (``rosbags`` is not one: a pure-Python bag library the core may use)."""
CORE = ('config', 'vocabulary', 'labelling', 'visualization', 'depth', 'pipeline')
"""What "the core" stands for in the table's "may import" column."""
MAX_LINES = 450
LONG_FILES_ALLOWED: dict[str, str] = {}
"""Files allowed over MAX_LINES, each with the reason it is one file."""


def module_name(path: Path) -> str:
    """``trident_ros/models/sam.py`` -> ``models.sam``; ``trident_ros/models/__init__.py`` -> ``models``."""
    parts = path.relative_to(PACKAGE).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob('*.py'))}


def imports(name: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import in module ``name``, function-local ones included.

    Names inside ``trident_ros`` are given relative to it (``models.sam``), others as written
    (``torch.nn``). ``from .x import y`` counts ``x.y`` when that is a module, else ``x``.
    """
    path = MODULES[name]
    package = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = '.'.join([*base, *(node.module.split('.') if node.module else [])])
            elif node.module and node.module.split('.')[0] == 'trident_ros':
                target = node.module.removeprefix('trident_ros').lstrip('.')
            else:
                found.append((node.module or '', node.lineno))
                continue
            for alias in node.names:
                child = f'{target}.{alias.name}' if target else alias.name
                found.append((child if child in MODULES else target, node.lineno))
    internal = []
    for module, line in found:
        if module.startswith('trident_ros.'):
            module = module.removeprefix('trident_ros.')
        internal.append((module, line))
    return internal


def internal_imports(name: str) -> set[str]:
    return {module for module, _ in imports(name) if module in MODULES and module != name}


def module_map() -> dict[str, set[str]]:
    """``docs/architecture.md``'s module map: module name -> the entries of its "may import" column."""
    rows = {}
    for line in ARCHITECTURE.read_text(encoding='utf-8').splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if len(cells) != 3 or not cells[0].startswith('`') or not cells[0].endswith('.py`'):
            continue
        name = module_name(PACKAGE / cells[0].strip('`'))
        entries = {entry.strip().strip('`') for entry in cells[2].split(',') if entry.strip()}
        if 'the core' in entries:
            entries = (entries - {'the core'}) | set(CORE)
        rows[name] = entries
    return rows


def allowed(module: str, entries: set[str]) -> bool:
    """Whether ``module`` (of ours) is among ``entries`` (modules, and rooms written ``room.*``)."""
    return module in entries or any(entry.endswith('.*') and (module == entry[:-2] or module.startswith(entry[:-1]))
                                    for entry in entries)


def test_the_walk_sees_relative_absolute_and_function_local_imports():
    assert 'config' in internal_imports('pipeline') and 'models' in internal_imports('pipeline')
    assert {'models.clip', 'models.dino', 'models.sam', 'models.build'} <= internal_imports('models')
    assert 'errors' in internal_imports('models.build') and 'models.weights' in internal_imports('models.build')
    assert 'rclpy' in {module for module, _ in imports('ros.main')}


def test_every_module_has_a_row_in_the_module_map_and_every_row_a_module():
    rows = module_map()
    assert set(MODULES) - {''} - {'msg'} == set(rows) - {''}, (
        f'without a row: {sorted(set(MODULES) - set(rows) - {"msg"})}; '
        f'rows without a module: {sorted(set(rows) - set(MODULES))}')


@pytest.mark.parametrize('name', sorted(MODULES))
def test_imports_follow_the_module_map(name):
    entries = module_map().get(name, set())
    ours = sorted(module for module in internal_imports(name) if module and not allowed(module, entries))
    assert not ours, f'{MODULES[name]} imports {ours}; its row in docs/architecture.md allows {sorted(entries)}'
    if 'ROS' not in entries:
        ros = [(module, line) for module, line in imports(name) if module.split('.')[0] in ROS_PACKAGES]
        assert not ros, f'{MODULES[name]} imports ROS (module, line) but its row does not say ROS: {ros}'


def test_the_map_keeps_the_rooms_in_order():
    """The core never imports ros/ or tools/; models/ and stages/ never import methods/ or pipeline."""
    for name, entries in module_map().items():
        room = name.split('.')[0] if '.' in name else 'core'
        forbidden = {'core': ('ros', 'tools'), 'models': ('methods', 'pipeline', 'ros', 'tools'),
                     'stages': ('methods', 'pipeline', 'ros', 'tools'),
                     'methods': ('pipeline', 'ros', 'tools')}.get(room, ())
        bad = [entry for entry in entries if entry.split('.')[0] in forbidden]
        assert not bad and not (room in ('core', 'models', 'stages', 'methods') and 'ROS' in entries), (name, bad)


def test_no_import_cycles():
    graph = {name: internal_imports(name) for name in MODULES}
    cycles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 'open'
        for child in sorted(graph[name]):
            if child == '':
                continue
            if state.get(child) == 'open':
                cycles.append(stack[stack.index(child):] + [child])
            elif child not in state:
                visit(child, stack + [child])
        state[name] = 'done'

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # a package's __init__ importing its own submodules is no cycle
    cycles = [cycle for cycle in cycles if not all(step.startswith(cycle[0] + '.') or step == cycle[0]
                                                   for step in cycle)]
    assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(cycle) for cycle in cycles)


def test_no_oversized_files():
    long = {str(path.relative_to(PACKAGE)): count for path in MODULES.values()
            if (count := len(path.read_text(encoding='utf-8').splitlines())) > MAX_LINES}
    unexplained = {name: count for name, count in long.items() if name not in LONG_FILES_ALLOWED}
    assert not unexplained, f'over {MAX_LINES} lines (split, or say why in LONG_FILES_ALLOWED): {unexplained}'
    stale = set(LONG_FILES_ALLOWED) - set(long)
    assert not stale, f'no longer over {MAX_LINES} lines, remove from LONG_FILES_ALLOWED: {stale}'


def test_only_the_fleet_tool_imports_ray():
    """Ray is an optional extra: the node, the core and the other tools import without it."""
    users = {name for name in MODULES if any(module.split('.')[0] == 'ray' for module, _ in imports(name))}
    assert users == {'tools.fleet'}, users
