"""Adding a method is one module and one registration: a test-only method (``plugin_method.py``) through the
pipeline, the configuration and ``trident-segment`` (the node uses the same mechanism: ``TRIDENT_METHOD_MODULES``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from trident_ros import methods
from trident_ros.config import ConfigError, TridentConfig
from trident_ros.pipeline import TridentPipeline
from trident_ros.tools.measure import synthetic_image

HERE = Path(__file__).resolve().parent
TINY = {'models': {'model_scale': 'tiny', 'random_weights': True, 'device': 'cpu'}, 'labelling.prob_thd': 0.0}


@pytest.fixture(scope='module')
def plugin() -> Iterator[None]:
    """``plugin_test`` registered in this process for this module's tests, and gone after them (the tests after
    these, in-process nodes among them, see the built-in methods only).
    """
    registry = dict(methods._REGISTRY)
    sys.path.insert(0, str(HERE))
    import plugin_method  # noqa: F401 (registers plugin_test)
    yield
    methods._REGISTRY.clear()
    methods._REGISTRY.update(registry)
    sys.modules.pop('plugin_method', None)
    sys.path.remove(str(HERE))


def test_a_registered_method_runs_through_the_pipeline_with_its_own_section(plugin):
    assert 'plugin_test' in methods.names() and 'plugin_test.sign' in TridentConfig.field_specs()
    config = TridentConfig.from_mapping({**TINY, 'method': 'plugin_test'})
    assert config.windows.whole_image and config.method_params.sign == 1.0  # its preset, its section
    image = synthetic_image(160, 120, seed=3)
    pipeline = TridentPipeline(config)
    assert pipeline.models.loaded == ('clip',)
    labels = pipeline.segment(image, 'door, chair').labels
    flipped = TridentPipeline(config.replace({'plugin_test.sign': -1}), models=pipeline.models).segment(
        image, 'door, chair').labels
    assert set(np.unique(labels)) == {1, 2} and np.array_equal(flipped, 3 - labels)
    with pytest.raises(ConfigError, match='plugin_test.sign=0.5: must be 1 or -1'):
        config.replace({'plugin_test.sign': 0.5})


def run_segment(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRIDENT_METHOD_MODULES='plugin_method',
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get('PYTHONPATH', '')]))
    return subprocess.run([sys.executable, '-m', 'trident_ros.tools.segment', *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_the_cli_finds_the_method_through_the_environment(tmp_path):
    config = tmp_path / 'plugin.yaml'
    config.write_text(yaml.safe_dump({'trident': {'ros__parameters': {
        'method': 'plugin_test', 'plugin_test': {'sign': -1.0}, 'models': TINY['models'],
        'labelling': {'prob_thd': 0.0}}}}))
    printed = run_segment(['--config', str(config), '--print-config'])
    assert printed.returncode == 0, printed.stderr
    flat = yaml.safe_load(printed.stdout)
    assert flat['method'] == 'plugin_test' and flat['plugin_test.sign'] == -1.0 and flat['windows.whole_image']
    cv2.imwrite(str(tmp_path / 'scene.png'), cv2.cvtColor(synthetic_image(96, 64), cv2.COLOR_RGB2BGR))
    result = run_segment([str(tmp_path / 'scene.png'), '-v', 'door, chair', '-o', str(tmp_path / 'out'),
                          '--config', str(config)])
    assert result.returncode == 0, result.stderr
    labels = cv2.imread(str(tmp_path / 'out' / 'scene_labels.png'), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (64, 96) and set(np.unique(labels)) <= {1, 2}


CORE_FILES = ('trident_ros/pipeline.py', 'trident_ros/config.py', 'trident_ros/models/build.py')
BUILT_IN = ('corrclip', 'trident', 'trident_fast', 'proxy', 'maskclip', 'sclip', 'clearclip', 'naclip', 'cliptrase',
            'scclip', 'resclip', 'resclip_rcs')


@pytest.mark.parametrize('path', CORE_FILES)
def test_the_core_never_compares_or_names_a_method(path):
    """The pipeline, the configuration and model building look methods up; they never name one (docstrings aside)."""
    import ast
    import re

    source = (HERE.parents[1] / path).read_text(encoding='utf-8')
    assert not re.findall(r'method\s*(?:==|!=|\bin\b|\bnot in\b)', source), path
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    literals = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings]
    named = sorted({name for name in BUILT_IN if name in literals} - {'trident'})
    assert not named, f'{path} names methods: {named}'
    assert literals.count('trident') == (path == 'trident_ros/config.py'), path  # DEFAULT_METHOD, once
