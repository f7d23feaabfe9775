"""The node with depth (``use_depth``) as real processes over real DDS, tiny random-weight models.

One node process serves the module, first fed by ``fake_camera depth:=true`` (synthetic registered
depth of known geometry), then, with the fake camera stopped, by frames this test sends itself.
Tests run in file order.
"""
from __future__ import annotations  # noqa: I001 (ros_helpers first: it checks the ROS 2 environment)

import time

import numpy as np
import pytest

from ros_helpers import (BEST_EFFORT, LATCHED, RELIABLE, ROOT, RosProcess, TestNode, executable, fresh_domain_id,
                         ros_env, running, wait_until)

import yaml
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import Point, Vector3
from lifecycle_msgs.msg import Transition
from rcl_interfaces.srv import SetParameters
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header, String
from vision_msgs.msg import Detection3DArray, LabelInfo

from trident_ros.tools.demo import summary_3d_line
from trident_ros.ros.depth_io import RECENT_DEPTHS, DepthCounts, DepthIO
from trident_ros.ros.fake_camera import synthetic_depth, synthetic_intrinsics
from trident_ros.labelling import Segmentation, class_masks
from trident_ros.msg import ClassMask, ClassMaskArray
from trident_ros.vocabulary import parse_vocabulary

NODE = '/trident'
VOCABULARY = 'floor, wall, door, sofa; couch'
FIRST_NAMES = ['floor', 'wall', 'door', 'sofa']
SMALL = (96, 128)  # (H, W) of the frames this test sends (fast on a CPU)
_stamps = iter(range(5000, 100000))
POINT_FIELD_TYPES = {PointField.INT8: 'i1', PointField.UINT8: 'u1', PointField.INT16: 'i2',
                     PointField.UINT16: 'u2', PointField.INT32: 'i4', PointField.UINT32: 'u4',
                     PointField.FLOAT32: 'f4', PointField.FLOAT64: 'f8'}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope='module')
def env(tmp_path_factory) -> dict[str, str]:
    return ros_env(fresh_domain_id(), tmp_path_factory.mktemp('ros_log'))


@pytest.fixture(scope='module')
def client(env):
    node = TestNode(int(env['ROS_DOMAIN_ID']))
    yield node
    node.close()


@pytest.fixture(scope='module')
def topics(client) -> dict:
    """Subscriptions made before the processes start (discovery takes time)."""
    return {
        'labels': client.subscribe(Image, f'{NODE}/labels'),
        'confidence': client.subscribe(Image, f'{NODE}/confidence'),
        'masks': client.subscribe(ClassMaskArray, f'{NODE}/masks'),
        'points': client.subscribe(PointCloud2, f'{NODE}/points'),
        'detections_3d': client.subscribe(Detection3DArray, f'{NODE}/detections_3d'),
        'depth': client.subscribe(Image, '/depth', BEST_EFFORT),
        'depth_info': client.subscribe(CameraInfo, '/depth/camera_info', BEST_EFFORT),
        'diagnostics': client.subscribe(DiagnosticArray, '/diagnostics'),
    }


@pytest.fixture(scope='module')
def node(env, client, topics, tmp_path_factory):
    """The node, configured and active, tiny random models, depth on."""
    log = tmp_path_factory.mktemp('node') / 'trident.log'
    process = RosProcess([executable('trident_node'), '--ros-args', '-p', 'models.random_weights:=true',
                          '-p', 'models.model_scale:=tiny', '-p', 'models.device:=cpu', '-p', 'depth.use:=true',
                          '-p', f'vocabulary:={VOCABULARY}'], env, log)
    with running(client, process, NODE):
        for transition_id in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
            assert client.change_state(NODE, transition_id), process.output()
        yield process
        assert 'Traceback' not in process.output(), process.output()


@pytest.fixture(scope='module')
def camera(env, node, tmp_path_factory):
    """``fake_camera depth:=true`` publishing the room scene at 1 Hz (stopped by the later tests)."""
    process = RosProcess([executable('fake_camera'), '--ros-args', '-p', 'depth:=true',
                          '-p', 'rate:=1.0', '-p', f'files:=[{ROOT / "trident_ros" / "data" / "room.png"}]',
                          '-p', 'reliability:=reliable'], env, tmp_path_factory.mktemp('camera') / 'camera.log')
    yield process
    if process.alive():
        assert process.stop() == 0, process.output()


@pytest.fixture(scope='module')
def sender(client) -> dict:
    return {'image': client.publisher(Image, '/image', RELIABLE), 'depth': client.publisher(Image, '/depth', RELIABLE),
            'info': client.publisher(CameraInfo, '/depth/camera_info', RELIABLE)}


# ------------------------------------------------------------------ helpers
def key(msg) -> tuple[int, int]:
    return msg.header.stamp.sec, msg.header.stamp.nanosec


def by_stamp(collector, stamp: tuple[int, int]):
    return next((m for m in collector.snapshot() if key(m) == stamp), None)


def decode_mono8(msg: Image) -> np.ndarray:
    assert msg.encoding == 'mono8'
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)[:, :msg.width]


def cloud_fields(msg: PointCloud2) -> np.ndarray:
    """``(H, W)`` structured array of the cloud's fields, read from its fields, offsets, point_step and row_step."""
    order = '>' if msg.is_bigendian else '<'
    dtype = np.dtype({'names': [f.name for f in msg.fields], 'offsets': [f.offset for f in msg.fields],
                      'formats': [order + POINT_FIELD_TYPES[f.datatype] for f in msg.fields],
                      'itemsize': msg.point_step})
    assert all(f.count == 1 for f in msg.fields) and msg.row_step >= msg.width * msg.point_step
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.row_step)[:, :msg.width * msg.point_step]
    return np.ascontiguousarray(rows).view(dtype).reshape(msg.height, msg.width)


def expected_points(depth: Image, info: CameraInfo) -> np.ndarray:
    """``(H, W, 3)`` back-projection of a 16UC1 depth message, computed here independently."""
    depth_m = np.frombuffer(bytes(depth.data), np.uint16).reshape(depth.height, depth.width) * 0.001
    depth_m = np.where(depth_m > 0, depth_m, np.nan)
    fx, cx, fy, cy = info.k[0], info.k[2], info.k[4], info.k[5]
    v, u = np.mgrid[0:depth.height, 0:depth.width]
    return np.stack([(u - cx) * depth_m / fx, (v - cy) * depth_m / fy, depth_m], axis=-1)


def diagnostics(topics, since: float) -> dict[str, str]:
    def find():
        for msg in topics['diagnostics'].snapshot(after=since + 1.1):
            for status in msg.status:
                if status.name == f'{NODE}: segmentation':
                    return {kv.key: kv.value for kv in status.values}
        return None
    values = wait_until(find, 10.0)
    assert values is not None, 'no diagnostics'
    return values


def send(sender, topics, depth: Image | None = None, info: CameraInfo | None = None, frame_id: str = 'camera',
         names=('labels', 'masks'), timeout: float = 60.0, depth_offset_ns: int = 0,
         sec: int | None = None) -> tuple[tuple[int, int], dict]:
    """Publish depth/info (if given), then a SMALL colour frame, all with one stamp (``sec``, else a fresh one).

    Sent again every 3 s until the outputs ``names`` for that stamp arrived; returns the stamp and them.
    """
    stamp = Time(sec=next(_stamps) if sec is None else sec, nanosec=500)
    height, width = SMALL
    rgb = np.random.default_rng(stamp.sec).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image(header=Header(stamp=stamp, frame_id=frame_id), height=height, width=width, encoding='rgb8',
                  step=width * 3, data=rgb.tobytes())
    for msg in (depth, info):
        if msg is not None:
            msg.header.stamp = Time(sec=stamp.sec, nanosec=stamp.nanosec + depth_offset_ns)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg, pub in ((depth, sender['depth']), (info, sender['info'])):
            if msg is not None:
                pub.publish(msg)
        time.sleep(0.2)
        sender['image'].publish(image)
        found = wait_until(lambda: all(by_stamp(topics[n], key(image)) for n in names), 3.0)
        if found:
            return key(image), {n: by_stamp(topics[n], key(image)) for n in names}
    raise AssertionError(f'outputs {names} did not arrive for stamp {stamp.sec}')


def depth_msg(array: np.ndarray, encoding: str, frame_id: str = 'camera', step: int | None = None) -> Image:
    return Image(header=Header(frame_id=frame_id), height=array.shape[0], width=array.shape[1], encoding=encoding,
                 step=step if step is not None else array.strides[0], data=array.tobytes())


def info_msg(height: int, width: int, frame_id: str = 'camera', k: list[float] | None = None) -> CameraInfo:
    return CameraInfo(header=Header(frame_id=frame_id), height=height, width=width,
                      k=k if k is not None else synthetic_intrinsics(height, width))


# ------------------------------------------------------------------ with the fake depth camera
@pytest.fixture(scope='module')
def fake_result(node, camera, topics) -> dict:
    """The first fake-camera frame for which every output and its depth arrived."""
    names = ('labels', 'confidence', 'masks', 'points', 'detections_3d', 'depth', 'depth_info')

    def complete():
        for cloud in topics['points'].snapshot():
            found = {n: by_stamp(topics[n], key(cloud)) for n in names}
            if all(found.values()):
                return found
        return None
    found = wait_until(complete, 180.0)
    assert found, f'no complete 3D result:\n{node.output()[-3000:]}'
    return found


def test_points_are_organized_on_the_label_grid_with_its_stamp(fake_result):
    labels, cloud = fake_result['labels'], fake_result['points']
    assert (cloud.height, cloud.width) == (labels.height, labels.width) == (480, 640)
    assert key(cloud) == key(labels) and cloud.header.frame_id == labels.header.frame_id == 'camera'
    assert [f.name for f in cloud.fields] == ['x', 'y', 'z', 'label', 'confidence', 'rgb']
    assert cloud.point_step == 24 and cloud.row_step == 24 * 640 and len(cloud.data) == 24 * 640 * 480
    assert not cloud.is_dense


def test_points_are_the_back_projection_of_the_published_depth(fake_result):
    points = cloud_fields(fake_result['points'])
    xyz = np.stack([points['x'], points['y'], points['z']], axis=-1)
    expected = expected_points(fake_result['depth'], fake_result['depth_info'])
    np.testing.assert_array_equal(np.isnan(xyz), np.isnan(expected))
    np.testing.assert_allclose(xyz[~np.isnan(xyz)], expected[~np.isnan(expected)], rtol=1e-5, atol=1e-6)
    # the known scene: an invalid strip at the left, a box face at 2 m, the floor 1 m below the camera
    assert np.isnan(xyz[:, :8, 2]).all()
    np.testing.assert_allclose(xyz[300, 150, 2], 2.0, rtol=1e-6)
    np.testing.assert_allclose(xyz[470, 320, 1], 1.0, atol=0.01)
    np.testing.assert_array_equal(synthetic_depth(480, 640)[300, 150], 2000)


def test_label_field_is_the_label_image_and_masks_have_the_median_of_their_points(fake_result):
    labels = decode_mono8(fake_result['labels'])
    points = cloud_fields(fake_result['points'])
    np.testing.assert_array_equal(points['label'], labels)
    confidence = decode_mono8(fake_result['confidence'])
    np.testing.assert_allclose(points['confidence'] * 255.0, confidence, atol=0.51)
    masks = fake_result['masks']
    assert masks.frame_3d == 'camera' and masks.masks
    xyz = np.stack([points['x'], points['y'], points['z']], axis=-1)
    for mask in masks.masks:
        mine = xyz[(labels == mask.class_id) & np.isfinite(xyz[..., 2])]
        assert mask.num_points == len(mine) > 0
        np.testing.assert_allclose([mask.position.x, mask.position.y, mask.position.z], np.median(mine, axis=0),
                                   rtol=1e-4, atol=1e-5)
        extent = np.percentile(mine, 95, axis=0) - np.percentile(mine, 5, axis=0)
        np.testing.assert_allclose([mask.size.x, mask.size.y, mask.size.z], extent, rtol=1e-4, atol=1e-5)
    detections = fake_result['detections_3d']
    assert key(detections) == key(masks)
    assert [int(d.id) for d in detections.detections] == [m.class_id for m in masks.masks]
    for detection, mask in zip(detections.detections, masks.masks, strict=True):
        assert detection.results[0].hypothesis.class_id == FIRST_NAMES[mask.class_id - 1]
        assert detection.results[0].hypothesis.score == pytest.approx(mask.score)
        assert detection.bbox.center.position.z == pytest.approx(mask.position.z)


def test_a_consumer_with_the_nav2_layer_checks_accepts_the_outputs(fake_result, client, topics):
    """The semantic_segmentation_layer's own checks pass.

    They are: mono8 mask, cloud size = mask size, exact stamps (its exact-time policy) and a latched
    LabelInfo, received by a subscriber that came late, whose names are the vocabulary's first names
    (what its ``classes`` parameters match).
    """
    layer = client  # subscriptions made now, long after LabelInfo was published: the late subscriber
    late = layer.subscribe(LabelInfo, f'{NODE}/label_info', LATCHED)
    masks = layer.subscribe(Image, f'{NODE}/labels', BEST_EFFORT)  # the layer subscribes best effort
    clouds = layer.subscribe(PointCloud2, f'{NODE}/points', BEST_EFFORT)
    confidences = layer.subscribe(Image, f'{NODE}/confidence', BEST_EFFORT)
    info = late.wait_for(lambda m: True, 20.0)
    assert info is not None, 'no latched LabelInfo for a late subscriber'
    assert [(c.class_id, c.class_name) for c in info.class_map][1:] == list(enumerate(FIRST_NAMES, start=1))
    assert info.threshold == pytest.approx(0.2)

    def synchronized():
        for cloud in clouds.snapshot():
            mask, confidence = by_stamp(masks, key(cloud)), by_stamp(confidences, key(cloud))
            if mask is not None and confidence is not None:
                return mask, confidence, cloud
        return None
    found = wait_until(synchronized, 60.0)
    assert found, 'no exactly synchronized mask + confidence + cloud'
    mask, confidence, cloud = found
    assert mask.encoding == 'mono8' and confidence.encoding == 'mono8'
    assert mask.width * mask.height == cloud.width * cloud.height and len(mask.data) >= mask.width * mask.height
    assert {f.name for f in cloud.fields} >= {'x', 'y', 'z'}
    assert set(np.unique(decode_mono8(mask))) <= set(range(len(FIRST_NAMES) + 1))


def test_a_vocabulary_change_updates_label_info(fake_result, client, topics):
    info = client.subscribe(LabelInfo, f'{NODE}/label_info', LATCHED)
    publisher = client.publisher(String, f'{NODE}/vocabulary', RELIABLE)
    since = time.monotonic()

    def updated():
        publisher.publish(String(data='door, chair; seat, floor'))
        return info.wait_for(lambda m: [c.class_name for c in m.class_map][1:] == ['door', 'chair', 'floor'],
                             2.0, after=since)
    assert wait_until(updated, 30.0), 'LabelInfo did not follow the vocabulary'
    since = time.monotonic()
    publisher.publish(String(data=VOCABULARY))
    assert info.wait_for(lambda m: [c.class_name for c in m.class_map][1:] == FIRST_NAMES, 30.0, after=since)
    client.node.destroy_publisher(publisher)


# ------------------------------------------------------------------ frames sent by the test
def test_colour_without_depth_still_gives_every_2d_output(node, camera, sender, topics):
    assert camera.stop() == 0
    since = time.monotonic()
    stamp, found = send(sender, topics, names=('labels', 'confidence', 'masks'))
    assert found['masks'].frame_3d == '' and all(m.num_points == 0 for m in found['masks'].masks)
    time.sleep(1.0)
    assert by_stamp(topics['points'], stamp) is None
    values = diagnostics(topics, since)
    assert int(values['depth_frames_2d_only']) >= 1 and int(values['depth_frames_3d']) >= 1
    assert float(values['latency_ms.depth_3d']) > 0.0  # the 3D cost of the last frame


def test_depth_in_a_foreign_frame_gives_a_warning_and_no_3d(node, sender, topics):
    height, width = SMALL
    stamp, found = send(sender, topics, depth_msg(synthetic_depth(height, width), '16UC1', frame_id='elsewhere'),
                        info_msg(height, width, frame_id='elsewhere'))
    assert found['masks'].frame_3d == ''
    assert node.wait_for_output("depth frame 'elsewhere' is not the image frame 'camera'", 10.0)
    time.sleep(1.0)
    assert by_stamp(topics['points'], stamp) is None


def test_depth_of_another_size_and_32fc1_is_resampled_to_the_colour_grid(node, sender, topics):
    height, width = SMALL
    half = synthetic_depth(height // 2, width // 2).astype(np.float32) * 0.001
    stamp, found = send(sender, topics, depth_msg(half, '32FC1'), info_msg(height // 2, width // 2),
                        names=('labels', 'masks', 'points'))
    cloud = found['points']
    assert (cloud.height, cloud.width) == SMALL
    z = cloud_fields(cloud)['z']
    expected = np.repeat(np.repeat(half, 2, axis=0), 2, axis=1)
    np.testing.assert_allclose(np.where(expected > 0, expected, np.nan), z, rtol=1e-6)


@pytest.mark.parametrize('case', ['rgb8 encoding', 'short step', 'short data', 'no focal length', 'all NaN'])
def test_garbage_depth_never_crashes(node, sender, topics, case):
    height, width = SMALL
    depth, info = depth_msg(synthetic_depth(height, width), '16UC1'), info_msg(height, width)
    if case == 'rgb8 encoding':
        depth = depth_msg(np.zeros((height, width, 3), np.uint8), 'rgb8')
    elif case == 'short step':
        depth.step = width  # one byte a pixel
    elif case == 'short data':
        depth.data = bytes(depth.data)[:-7]
    elif case == 'no focal length':
        info.k = [0.0] * 9
    else:
        depth = depth_msg(np.full((height, width), np.nan, np.float32), '32FC1')
    since = time.monotonic()
    names = ('labels', 'masks', 'points') if case == 'all NaN' else ('labels', 'masks')
    stamp, found = send(sender, topics, depth, info, names=names)
    if case == 'all NaN':
        assert np.isnan(cloud_fields(found['points'])['z']).all()
        assert found['masks'].frame_3d == 'camera' and all(m.num_points == 0 for m in found['masks'].masks)
    else:
        assert found['masks'].frame_3d == ''
        assert int(diagnostics(topics, since)['depth_refused']) >= 1
        assert 'depth refused, no 3D' in node.output()
    assert node.alive()


def test_stamps_that_go_backwards_restart_the_pairing_and_every_frame_has_3d(node, sender, topics):
    """A bag played in a loop (or a simulator reset): stamps 100, 101, 102 s, then 60, 61, 62 s."""
    height, width = SMALL
    for sec in (100, 101, 102, 60, 61, 62):
        stamp, found = send(sender, topics, depth_msg(synthetic_depth(height, width), '16UC1'),
                            info_msg(height, width), names=('labels', 'masks', 'points'), sec=sec)
        assert stamp == (sec, 500) and found['masks'].frame_3d == 'camera', f'no 3D at {sec} s'
        assert (found['points'].height, found['points'].width) == SMALL
        assert np.isfinite(cloud_fields(found['points'])['z']).any()


def test_depth_within_the_slop_matches_and_exact_sync_needs_equal_stamps(node, client, sender, topics):
    height, width = SMALL

    def frame(offset_ns: int) -> tuple[tuple[int, int], dict]:
        return send(sender, topics, depth_msg(synthetic_depth(height, width), '16UC1'), info_msg(height, width),
                    depth_offset_ns=offset_ns)

    assert frame(20_000_000)[1]['masks'].frame_3d == 'camera'  # 20 ms apart: within sync_slop (0.1 s)
    request = SetParameters.Request(parameters=[Parameter('depth.exact_sync', value=True).to_parameter_msg()])
    assert client.call(SetParameters, f'{NODE}/set_parameters', request).results[0].successful
    assert node.wait_for_output('(exact stamps)', 10.0)  # the depth subscriptions were made again
    assert frame(20_000_000)[1]['masks'].frame_3d == ''
    assert frame(0)[1]['masks'].frame_3d == 'camera'


def test_more_than_255_classes_warn_that_nav2_needs_mono8_and_prob_thd_updates_label_info(node, client, sender,
                                                                                          topics):
    info = client.subscribe(LabelInfo, f'{NODE}/label_info', LATCHED)
    publisher = client.publisher(String, f'{NODE}/vocabulary', RELIABLE)
    names = [f'thing{i}' for i in range(256)]
    since = time.monotonic()

    def updated():
        publisher.publish(String(data=', '.join(names)))
        return info.wait_for(lambda m: len(m.class_map) == 257, 3.0, after=since)
    assert wait_until(updated, 60.0), 'the 256-class vocabulary was not taken'
    assert node.wait_for_output("~/labels is mono16, which Nav2's semantic_segmentation_layer cannot read", 10.0)
    assert send(sender, topics)[1]['labels'].encoding == 'mono16'
    since = time.monotonic()
    publisher.publish(String(data=VOCABULARY))
    assert info.wait_for(lambda m: [c.class_name for c in m.class_map][1:] == FIRST_NAMES, 30.0, after=since)
    since = time.monotonic()
    request = SetParameters.Request(parameters=[Parameter('labelling.prob_thd', value=0.35).to_parameter_msg()])
    assert client.call(SetParameters, f'{NODE}/set_parameters', request).results[0].successful
    assert info.wait_for(lambda m: abs(m.threshold - 0.35) < 1e-6, 10.0, after=since), 'threshold not updated'
    client.node.destroy_publisher(publisher)


def test_the_frame_in_progress_keeps_its_depth_while_newer_depth_arrives(tmp_path):
    """A slow pipeline keeps the depth of the frame it processes.

    That depth (pinned when the worker takes the frame), even one that arrives after that, survives
    more newer depth pairs than are kept.
    """
    client = TestNode(fresh_domain_id(), 'depth_io_test')
    try:
        parameters = {'depth.sync_slop': 0.1, 'depth.exact_sync': False, 'depth.scale': 0.001, 'depth.min': 0.0,
                      'depth.max': 20.0}
        warnings: list[str] = []
        depth_io = DepthIO(client.node, parameters, RELIABLE, RELIABLE, DepthCounts(),
                           lambda kind, text: warnings.append(text))
        depth_pub, info_pub = client.publisher(Image, '/depth'), client.publisher(CameraInfo, '/depth/camera_info')
        height, width = SMALL
        labels = np.ones(SMALL, np.uint8)
        seg = Segmentation(labels, np.ones(SMALL, np.float32), class_masks(labels, np.ones(SMALL), ['floor']),
                           ['floor'])
        wait_until(lambda: depth_pub.get_subscription_count() and info_pub.get_subscription_count(), 10.0)

        def publish(sec: int) -> None:
            depth, info = depth_msg(synthetic_depth(height, width), '16UC1'), info_msg(height, width)
            depth.header.stamp = info.header.stamp = Time(sec=sec)
            depth_pub.publish(depth)
            info_pub.publish(info)
            time.sleep(0.05)

        early, late = Header(stamp=Time(sec=10), frame_id='camera'), Header(stamp=Time(sec=20), frame_id='camera')
        publish(10)
        time.sleep(0.5)
        depth_io.pin(early)  # the worker takes a frame whose depth is there
        for sec in range(11, 11 + RECENT_DEPTHS + 2):
            publish(sec)
        time.sleep(0.5)
        assert depth_io.compute(early, seg) is not None, warnings
        depth_io.pin(late)  # the worker takes a frame whose depth comes later
        publish(20)
        for sec in range(21, 21 + RECENT_DEPTHS + 2):
            publish(sec)
        time.sleep(0.5)
        frame = depth_io.compute(late, seg)
        assert frame is not None and frame.classes[1].num_points > 0, warnings
        assert depth_io.compute(Header(stamp=Time(sec=11), frame_id='camera'), seg) is None  # evicted, not pinned
        depth_io.destroy()
    finally:
        client.close()


# ------------------------------------------------------------------ the launch file
@pytest.mark.launch
def test_demo_launch_with_use_depth_publishes_labelled_points(tmp_path):
    """``ros2 launch ... demo:=true use_depth:=true``: the fake camera's depth reaches the node."""
    domain = fresh_domain_id()
    client = TestNode(domain, 'depth_launch_test')
    try:
        clouds = client.subscribe(PointCloud2, f'{NODE}/points')
        masks = client.subscribe(ClassMaskArray, f'{NODE}/masks')
        process = RosProcess(['ros2', 'launch', 'trident_ros', 'trident.launch.py', 'demo:=true', 'use_depth:=true',
                              'random_weights:=true', 'model_scale:=tiny', 'device:=cpu'],
                             ros_env(domain, tmp_path), tmp_path / 'launch.log')
        try:
            cloud = clouds.wait_for(lambda m: (m.width, m.height) == (640, 480), 120)
            assert cloud is not None, process.output()[-3000:]
            assert masks.wait_for(lambda m: key(m) == key(cloud) and m.frame_3d == 'camera', 10), process.output()
            assert np.isfinite(cloud_fields(cloud)['z']).mean() > 0.9
        finally:
            assert process.stop() == 0, process.output()
    finally:
        client.close()


def test_nav2_layer_example_is_wired_to_the_node_topics_and_its_classes():
    config = yaml.safe_load((ROOT / 'config' / 'nav2_semantic_layer.yaml').read_text())
    parameters = config['local_costmap']['local_costmap']['ros__parameters']
    layer = parameters['semantic_segmentation_layer']
    assert 'semantic_segmentation_layer' in parameters['plugins']
    assert layer['plugin'] == 'semantic_segmentation_layer::SemanticSegmentationLayer'
    source = layer[layer['observation_sources']]
    assert {source[k] for k in ('segmentation_topic', 'confidence_topic', 'labels_topic', 'pointcloud_topic')} == {
        f'{NODE}/labels', f'{NODE}/confidence', f'{NODE}/label_info', f'{NODE}/points'}
    trident = yaml.safe_load((ROOT / 'config' / 'trident.yaml').read_text())['/**/trident']['ros__parameters']
    first_names = {names[0] for names in parse_vocabulary(trident['vocabulary']).classes}
    classes = [name for kind in source['class_types'] for name in source[kind]['classes']]
    assert classes and set(classes) <= first_names and len(classes) == len(set(classes))


def test_demo_3d_summary_line():
    msg = ClassMaskArray(frame_3d='camera', masks=[
        ClassMask(label='door', class_id=1, num_points=10, position=Point(x=0.5, y=-0.25, z=2.0),
                  size=Vector3(x=1.0, y=2.0, z=0.25)),
        ClassMask(label='wall', class_id=2, num_points=0)])
    assert summary_3d_line('room', msg) == ('room 3D (camera): door at (0.50, -0.25, 2.00) m, '
                                            'extent 1.0 x 2.0 x 0.2 m, 10 points')
    assert summary_3d_line('street', ClassMaskArray()) == 'street 3D (no depth): no points'
