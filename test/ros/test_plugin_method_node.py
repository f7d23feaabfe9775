"""The test-only method of ``test/core/plugin_method.py`` through the node: one module plus one registration,
named in ``TRIDENT_METHOD_MODULES``, is a ``method`` of the node with its own parameters section.
"""
from __future__ import annotations

import numpy as np
from lifecycle_msgs.msg import Transition

# ros_helpers first: it checks the ROS 2 environment with a clear message
from ros_helpers import ROOT, RosProcess, TestNode, executable, fresh_domain_id, ros_env
from sensor_msgs.msg import Image
from std_msgs.msg import Header

NODE = '/trident'
PLUGIN_DIR = ROOT / 'test' / 'core'


def test_the_plugin_method_runs_in_the_node_with_its_section_and_preset(tmp_path):
    domain = fresh_domain_id()
    env = ros_env(domain, tmp_path)
    env.update(TRIDENT_METHOD_MODULES='plugin_method',
               PYTHONPATH=f'{PLUGIN_DIR}:{env["PYTHONPATH"]}' if env.get('PYTHONPATH') else str(PLUGIN_DIR))
    client = TestNode(domain, 'plugin_test')
    labels = client.subscribe(Image, f'{NODE}/labels')
    process = RosProcess([executable('trident_node'), '--ros-args', '-p', 'method:=plugin_test',
                          '-p', 'plugin_test.sign:=-1.0', '-p', 'models.random_weights:=true',
                          '-p', 'models.model_scale:=tiny', '-p', 'vocabulary:=door, chair'],
                         env, tmp_path / 'trident.log')
    try:
        client.wait_for_node(NODE, process)
        assert client.describe_parameters(NODE, ['plugin_test.sign'])['plugin_test.sign'].description
        assert client.change_state(NODE, Transition.TRANSITION_CONFIGURE), process.output()
        assert client.change_state(NODE, Transition.TRANSITION_ACTIVATE), process.output()
        shown = client.get_parameters(NODE, ['method', 'plugin_test.sign', 'windows.whole_image'])
        assert shown == {'method': 'plugin_test', 'plugin_test.sign': -1.0, 'windows.whole_image': True}  # preset
        camera = client.publisher(Image, '/image')
        rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
        frame = Image(header=Header(frame_id='plugin_camera'), height=48, width=64, encoding='rgb8', step=64 * 3,
                      data=rgb.tobytes())
        got = None
        for _ in range(30):
            camera.publish(frame)
            got = labels.wait_for(lambda m: m.header.frame_id == 'plugin_camera', 2.0)
            if got is not None:
                break
        assert got is not None and (got.width, got.height) == (64, 48), process.output()
    finally:
        code = process.stop()
        client.close()
    assert code == 0 and 'Traceback' not in process.output(), process.output()
