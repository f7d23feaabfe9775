"""The node with ``models.backend:=onnxruntime`` (tiny random-weight models, ONNX Runtime's CPU provider) as a real
process over real DDS, and the installed ``export_models`` executable.
"""
from __future__ import annotations  # noqa: I001 (ros_helpers first: it checks the ROS 2 environment)

import subprocess
import time

import numpy as np
import pytest
from ros_helpers import RELIABLE, RosProcess, TestNode, executable, fresh_domain_id, ros_env, running, wait_until

from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from sensor_msgs.msg import Image
from std_msgs.msg import Header

pytest.importorskip('onnxruntime')
pytestmark = pytest.mark.onnx
NODE = '/trident'


def test_installed_export_models_writes_the_graphs(tmp_path):
    """``ros2 run trident_ros export_models`` runs this executable."""
    result = subprocess.run([executable('export_models'), '--method', 'sclip', '--random-weights', '--tiny',
                             '--device', 'cpu', '--engine-cache-dir', str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob('clip_rule_sclip-224-fp32-*.onnx')
    assert f'clip_rule_sclip: {path}' in result.stdout


def test_the_node_on_onnxruntime_reports_its_graphs_and_segments(tmp_path):
    env = ros_env(fresh_domain_id(), tmp_path / 'ros_log')
    client = TestNode(int(env['ROS_DOMAIN_ID']))
    try:
        diagnostics = client.subscribe(DiagnosticArray, '/diagnostics')
        labels = client.subscribe(Image, f'{NODE}/labels')
        camera = client.publisher(Image, '/image', RELIABLE)
        process = RosProcess([executable('trident_node'), '--ros-args', '-p', 'models.random_weights:=true',
                              '-p', 'models.model_scale:=tiny', '-p', 'models.device:=cpu',
                              '-p', 'models.backend:=onnxruntime', '-p', f'models.engine_cache_dir:={tmp_path}',
                              '-p', 'method:=trident_fast', '-p', 'vocabulary:=floor, wall, door'],
                             env, tmp_path / 'trident.log')
        with running(client, process, NODE):
            for transition_id in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
                assert client.change_state(NODE, transition_id), process.output()
            assert sorted(path.name.split('-')[0] for path in tmp_path.glob('*.onnx')) == \
                ['clip_guided', 'dino_patches', 'sam_fused']
            output = process.output()
            assert 'building sam_fused (3/3)' in output and 'graphs ready' in output, output
            pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
            sent = time.monotonic()
            message = Image(header=Header(frame_id='camera'), height=96, width=128, encoding='rgb8', step=128 * 3,
                            data=pixels.tobytes())

            def labelled() -> bool:
                camera.publish(message)
                return labels.wait_for(lambda m: (m.height, m.width) == (96, 128), 2.0, after=sent) is not None

            assert wait_until(labelled, 60.0), process.output()
            status = diagnostics.wait_for(lambda m: any(v.key == 'engine_build' for s in m.status for v in s.values),
                                          10.0, after=time.monotonic())
            values = {v.key: v.value for v in status.status[0].values}
            assert values['engine_build'] == 'graphs ready: dino_patches, clip_guided, sam_fused'
            assert 'Traceback' not in process.output(), process.output()
    finally:
        client.close()
