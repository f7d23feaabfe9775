"""Depth to metres, back-projection, per-class statistics and the cloud buffer (the core, no ROS)."""
from __future__ import annotations

import numpy as np
import pytest

from trident_ros.depth import (
    CLOUD_DTYPE,
    DepthError,
    Intrinsics,
    back_project,
    class_points,
    cloud_points,
    depth_to_metres,
    packed_colors,
    resample_nearest,
)
from trident_ros.visualization import class_colors

# fx != fy and an off-centre principal point, for a 6 x 4 image
K = [100.0, 0.0, 2.0, 0.0, 50.0, 1.5, 0.0, 0.0, 1.0]
CAMERA = Intrinsics.from_k(K, width=6, height=4)


def test_16uc1_millimetres_and_invalid_depth_become_nan():
    raw = np.array([[0, 1000, 250, 65535], [1500, 99, 4000, 2000]], dtype=np.uint16)
    metres = depth_to_metres(raw, 0.001, min_depth=0.1, max_depth=10.0)
    assert metres.dtype == np.float32
    expected = np.array([[np.nan, 1.0, 0.25, np.nan], [1.5, np.nan, 4.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.isnan(metres), np.isnan(expected))
    np.testing.assert_allclose(metres[~np.isnan(metres)], expected[~np.isnan(expected)], rtol=1e-6)


def test_32fc1_metres_with_nan_inf_negative_and_out_of_range():
    raw = np.array([[np.nan, np.inf, -1.0, 0.0, 0.05, 0.5, 3.0, 12.0]], dtype=np.float32)
    metres = depth_to_metres(raw, 0.001, min_depth=0.1, max_depth=10.0)
    np.testing.assert_array_equal(np.isnan(metres), [[True] * 5 + [False, False, True]])
    np.testing.assert_array_equal(metres[0, 5:7], [0.5, 3.0])
    assert np.isnan(raw[0, 0]) and raw[0, 5] == 0.5  # the input is not modified


def test_depth_of_another_type_or_shape_is_refused():
    with pytest.raises(DepthError, match='uint16 or float32'):
        depth_to_metres(np.zeros((2, 2), np.int32), 0.001, 0.0, 10.0)
    with pytest.raises(DepthError, match=r'\(h, w\)'):
        depth_to_metres(np.zeros((2, 2, 1), np.float32), 0.001, 0.0, 10.0)


def test_back_projection_matches_hand_computed_points():
    depth = np.full((4, 6), np.nan, dtype=np.float32)
    depth[0, 0], depth[3, 5], depth[1, 2] = 2.0, 4.0, 1.0
    points = back_project(depth, CAMERA)
    assert points.shape == (4, 6, 3) and points.dtype == np.float32
    # (u - cx) z / fx, (v - cy) z / fy, z
    np.testing.assert_allclose(points[0, 0], [(0 - 2.0) * 2.0 / 100.0, (0 - 1.5) * 2.0 / 50.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(points[3, 5], [(5 - 2.0) * 4.0 / 100.0, (3 - 1.5) * 4.0 / 50.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(points[1, 2], [0.0, (1 - 1.5) / 50.0, 1.0], rtol=1e-6, atol=1e-9)
    assert np.isnan(points[2, 3]).all()
    assert np.isnan(points).any(axis=2).sum() == 4 * 6 - 3


def test_back_projection_refuses_intrinsics_of_another_size():
    with pytest.raises(DepthError, match='intrinsics are for 6x4'):
        back_project(np.ones((8, 12), np.float32), CAMERA)


def test_intrinsics_without_focal_length_are_refused():
    with pytest.raises(DepthError, match='focal length'):
        Intrinsics.from_k([0.0] * 9, 6, 4)
    with pytest.raises(DepthError, match='9'):
        Intrinsics.from_k([1.0] * 4, 6, 4)


def test_depth_of_another_size_is_resampled_nearest_with_scaled_intrinsics():
    small = np.arange(6, dtype=np.float32).reshape(2, 3) + 1.0  # half of a 6 x 4 grid
    big = resample_nearest(small, 4, 6)
    np.testing.assert_array_equal(big, np.repeat(np.repeat(small, 2, axis=0), 2, axis=1))
    assert resample_nearest(big, 4, 6) is big
    half = Intrinsics(50.0, 25.0, 0.75, 0.5, 3, 2)  # CAMERA on the half-size grid
    scaled = half.scaled_to(6, 4)
    assert (scaled.fx, scaled.fy, scaled.cx, scaled.cy, scaled.width, scaled.height) == (100.0, 50.0, 2.0, 1.5, 6, 4)
    # a depth pixel of the small image projects to the same ray from the big one's pixel centre
    points = back_project(big, scaled)
    u, v = 5, 3
    z = small[1, 2]
    np.testing.assert_allclose(points[v, u], [(u - 2.0) * z / 100.0, (v - 1.5) * z / 50.0, z], rtol=1e-6)


def test_class_points_median_and_percentile_extent():
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 50), np.uint8)
    labels[:, :25], labels[:20, 25:] = 1, 2  # class 3 is absent; class 4 has no valid point
    labels[39, 49] = 4
    points = rng.normal(size=(40, 50, 3)).astype(np.float32)
    points[0, :10] = np.nan  # no depth: not counted
    stats = class_points(labels, points)
    assert sorted(stats) == [1, 2, 4]
    for class_id in (1, 2):
        mine = points[(labels == class_id) & np.isfinite(points[..., 2])]
        assert stats[class_id].num_points == len(mine)
        np.testing.assert_allclose(stats[class_id].position, np.median(mine, axis=0), rtol=1e-5)
        extent = np.percentile(mine, 95, axis=0) - np.percentile(mine, 5, axis=0)
        np.testing.assert_allclose(stats[class_id].size, extent, rtol=1e-5)
    points[39, 49] = np.nan
    empty = class_points(labels, points)[4]
    assert empty.num_points == 0 and not empty.position.any() and not empty.size.any()
    assert stats[1].num_points == 40 * 25 - 10


def test_all_nan_depth_gives_classes_without_points():
    labels = np.ones((4, 6), np.uint16)
    stats = class_points(labels, back_project(np.full((4, 6), np.nan, np.float32), CAMERA))
    assert [(s.class_id, s.num_points) for s in stats.values()] == [(1, 0)]


def test_cloud_buffer_fields_and_colours():
    labels = np.array([[0, 1, 2, 1, 0, 2]] * 4, dtype=np.uint8)
    confidence = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    depth = np.full((4, 6), 2.0, np.float32)
    depth[0, 0] = np.nan
    points = back_project(depth, CAMERA)
    colors = class_colors(2)
    cloud = cloud_points(points, labels, confidence, colors)
    assert cloud.shape == (4, 6) and cloud.dtype == CLOUD_DTYPE and CLOUD_DTYPE.itemsize == 24
    np.testing.assert_array_equal(cloud['z'], depth)
    np.testing.assert_array_equal(cloud['x'], points[..., 0])
    np.testing.assert_array_equal(cloud['label'], labels)
    np.testing.assert_array_equal(cloud['confidence'], confidence)
    rgb = cloud['rgb'].view(np.uint32)
    r, g, b = (rgb >> 16) & 255, (rgb >> 8) & 255, rgb & 255
    np.testing.assert_array_equal(np.stack([r, g, b], axis=-1), colors[labels])
    data = np.frombuffer(cloud.tobytes(), np.uint8).reshape(4, 6, 24)
    assert not data[..., 14:16].any()  # padding is zero
    np.testing.assert_array_equal(packed_colors(colors).view(np.uint32), [0, 0x800000, 0x008000])
    with pytest.raises(ValueError, match='differ'):
        cloud_points(points[:2], labels, confidence, colors)
