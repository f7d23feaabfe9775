"""The node's depth side: depth subscriptions, image-to-depth matching and the 3D messages.

With ``use_depth`` the node subscribes ``depth`` (sensor_msgs/Image: ``16UC1`` in units of
``depth_scale`` metres, or ``32FC1`` metres, REP 118) and ``depth/camera_info`` with two plain
subscriptions, paired here (:class:`~trident_ros.ros.depth_pairing.DepthPairing`: equal stamps with
``exact_sync``, else the nearest within ``sync_slop``; stamps that go backwards restart the
pairing); the last pairs are kept, and the frame being processed holds on to its match
(:meth:`DepthIO.pin`). When a segmented frame is published, the pair whose stamp is nearest the
colour image's (within ``sync_slop``, or equal with ``exact_sync``) gives its 3D; a frame without
one is published in 2D only and counted. The colour image keeps the node's
newest-frame-only rule: depth never holds a frame back.

The depth must be registered to the colour image (same optical frame, e.g. a RealSense
``aligned_depth_to_color`` stream): a depth in another frame gets a throttled warning and no 3D.
A depth of another size is resampled (nearest) to the colour grid, its intrinsics scaled with it,
so ``~/points`` always has the label image's width, height and stamp.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from geometry_msgs.msg import Point, Pose, Vector3
from rclpy.node import Node
from rclpy.qos import QoSProfile
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from trident_ros.depth import (
    CLOUD_DTYPE,
    ClassPoints,
    DepthError,
    Intrinsics,
    back_project,
    class_points,
    cloud_points,
    depth_to_metres,
    resample_nearest,
)
from trident_ros.labelling import Segmentation
from trident_ros.ros.conversions import vision_msgs
from trident_ros.ros.depth_pairing import DepthPairing
from trident_ros.visualization import class_colors

DEPTH_ENCODINGS = {'16uc1': np.dtype('<u2'), 'mono16': np.dtype('<u2'), '32fc1': np.dtype('<f4')}
"""Accepted depth encodings and their little-endian element types (big-endian data is swapped)."""
RECENT_DEPTHS = 10  # depth/camera_info pairs kept for matching, and messages per topic waiting for a partner
POINT_FIELD_TYPES = {np.dtype('<f4'): PointField.FLOAT32, np.dtype('<u2'): PointField.UINT16}


@dataclass
class DepthCounts:
    """Frames by what their depth gave, for /diagnostics (counted by the frame worker only)."""

    with_3d: int = 0
    no_matching_depth: int = 0
    foreign_frame: int = 0
    refused: int = 0


@dataclass
class Frame3D:
    """The 3D of one segmented frame.

    Attributes:
        frame_id: the camera optical frame of the points (= the colour image's frame_id).
        points: ``(H, W, 3)`` float32 on the label image's grid, NaN without depth.
        classes: statistics per class id present in the label image.
    """

    frame_id: str
    points: np.ndarray
    classes: dict[int, ClassPoints]


def depth_image_to_array(msg: Image) -> np.ndarray:
    """A depth ``sensor_msgs/Image`` as ``(h, w)`` uint16 (16UC1, mono16) or float32 (32FC1).

    Raises:
        DepthError: another encoding, an empty image, or a ``step``/``data`` length that does not fit.
    """
    encoding = msg.encoding.strip().lower()
    if encoding not in DEPTH_ENCODINGS:
        raise DepthError(f'depth encoding {msg.encoding[:32]!r} is not 16UC1 (or mono16) or 32FC1')
    dtype = DEPTH_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise DepthError(f'empty depth image ({width}x{height})')
    if step < width * dtype.itemsize or step % dtype.itemsize:
        raise DepthError(f'depth step {step} does not fit {width} {encoding} pixels')
    if len(msg.data) != height * step:
        raise DepthError(f'depth data has {len(msg.data)} bytes, height*step is {height * step}')
    rows = np.frombuffer(msg.data, dtype=dtype.newbyteorder('>') if msg.is_bigendian else dtype)
    array = rows.reshape(height, step // dtype.itemsize)[:, :width]
    return np.ascontiguousarray(array, dtype=dtype)


def cloud_msg(cloud: np.ndarray, header: Header) -> PointCloud2:
    """An ``(H, W)`` :data:`~trident_ros.depth.CLOUD_DTYPE` array as an organized PointCloud2."""
    height, width = cloud.shape
    fields = [PointField(name=name, offset=offset, datatype=POINT_FIELD_TYPES[dtype], count=1)
              for name, (dtype, offset) in CLOUD_DTYPE.fields.items()]
    msg = PointCloud2(header=header, height=height, width=width, fields=fields, is_bigendian=sys.byteorder == 'big',
                      point_step=CLOUD_DTYPE.itemsize, row_step=CLOUD_DTYPE.itemsize * width, is_dense=False)
    msg.data = cloud.tobytes()  # set afterwards: bytes take rclpy's fast path here, not in the constructor
    return msg


def detections_msg(frame: Frame3D, seg: Segmentation, names: Sequence[str], header: Header) -> Any:
    """``vision_msgs/Detection3DArray``: one detection per class that has 3D points.

    Its hypothesis: class id = the class's first name, score = the mask's mean probability; box
    centre = the median point, size = the 5-95 percentile extent; ``id`` = the label-image value.
    """
    out = vision_msgs.Detection3DArray(header=header)
    for mask in seg.masks:
        stats = frame.classes.get(mask.class_id)
        if stats is None or stats.num_points == 0:
            continue
        hypothesis = vision_msgs.ObjectHypothesisWithPose()
        hypothesis.hypothesis.class_id = names[mask.class_id - 1]
        hypothesis.hypothesis.score = float(mask.score)
        hypothesis.pose.pose.position = point(stats.position)
        out.detections.append(vision_msgs.Detection3D(
            header=header, results=[hypothesis], id=str(mask.class_id),
            bbox=vision_msgs.BoundingBox3D(center=Pose(position=point(stats.position)), size=vector(stats.size))))
    return out


def nanoseconds(header: Header) -> int:
    """A header's stamp in nanoseconds."""
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


def point(xyz: np.ndarray) -> Point:
    """``(3,)`` -> geometry_msgs/Point."""
    return Point(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2]))


def vector(xyz: np.ndarray) -> Vector3:
    """``(3,)`` -> geometry_msgs/Vector3."""
    return Vector3(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2]))


class DepthIO:
    """Depth subscriptions and 3D publishers of one activation of the node.

    Args:
        node: the node.
        parameters: the node's depth parameter values (``depth.*``; the node makes a new DepthIO when one
            changes).
        qos: QoS of the depth and camera_info subscriptions.
        output_qos: QoS of ``~/points`` and ``~/detections_3d``.
        counts: where the frames are counted (kept by the node across activations).
        warn: ``(kind, message)``: the node's throttled warning.
        callback_group: of the depth subscriptions.
    """

    def __init__(self, node: Node, parameters: Mapping[str, Any], qos: QoSProfile, output_qos: QoSProfile,
                 counts: DepthCounts, warn: Callable[[str, str], None], callback_group: Any = None) -> None:
        self._node, self._parameters, self._counts, self._warn = node, parameters, counts, warn
        exact, slop = bool(parameters['depth.exact_sync']), float(parameters['depth.sync_slop'])
        self._pairing = DepthPairing(0 if exact else round(slop * 1e9), RECENT_DEPTHS)
        self._subs = [node.create_subscription(Image, 'depth', self._on_depth, qos, callback_group=callback_group),
                      node.create_subscription(CameraInfo, 'depth/camera_info', self._on_info, qos,
                                               callback_group=callback_group)]
        self._points_pub = node.create_publisher(PointCloud2, '~/points', output_qos)
        self._detections_pub = (node.create_publisher(vision_msgs.Detection3DArray, '~/detections_3d', output_qos)
                                if vision_msgs is not None else None)
        node.get_logger().info(f'depth: subscribed to {self._subs[0].topic_name} + {self._subs[1].topic_name} '
                               f'({"exact stamps" if exact else f"sync_slop {slop:g} s"})')

    def destroy(self) -> None:
        """Remove the subscriptions and publishers."""
        for sub in self._subs:
            self._node.destroy_subscription(sub)
        self._node.destroy_publisher(self._points_pub)
        if self._detections_pub is not None:
            self._node.destroy_publisher(self._detections_pub)
        self._pairing.clear()

    def has_subscribers(self) -> bool:
        """Whether anybody subscribes to ``~/points`` or ``~/detections_3d``."""
        pubs = [p for p in (self._points_pub, self._detections_pub) if p is not None]
        return any(p.get_subscription_count() > 0 for p in pubs)

    def pin(self, header: Header) -> None:
        """Hold on to the depth of the frame the worker starts processing.

        Its match (from the kept pairs, or from depth arriving later within the slop) is not pushed
        out by newer depth while the pipeline runs, however long that takes.
        """
        self._pairing.pin(nanoseconds(header))

    def _on_depth(self, msg: Image) -> None:
        self._pairing.add_depth(nanoseconds(msg.header), msg)

    def _on_info(self, msg: CameraInfo) -> None:
        self._pairing.add_info(nanoseconds(msg.header), msg)

    def compute(self, header: Header, seg: Segmentation) -> Frame3D | None:
        """The 3D of a segmented frame, or None (counted, warned where the depth is unusable)."""
        pair = self._pairing.match(nanoseconds(header))
        if pair is None:
            self._counts.no_matching_depth += 1
            return None
        depth, info = pair
        if depth.header.frame_id != header.frame_id:
            self._counts.foreign_frame += 1
            self._warn('depth:frame', f'depth frame {depth.header.frame_id[:64]!r} is not the image frame '
                       f'{header.frame_id[:64]!r}: registered depth is needed (e.g. aligned_depth_to_color); no 3D')
            return None
        height, width = seg.labels.shape
        param = self._parameters
        try:
            raw = depth_image_to_array(depth)
            size = (int(info.width), int(info.height)) if info.width and info.height else (raw.shape[1], raw.shape[0])
            intrinsics = Intrinsics.from_k(info.k, *size).scaled_to(width, height)
            metres = depth_to_metres(raw, param['depth.scale'], param['depth.min'], param['depth.max'])
        except DepthError as error:
            self._counts.refused += 1
            self._warn(f'depth:{type(error).__name__}:{str(error)[:12]}', f'depth refused, no 3D: {error}')
            return None
        points = back_project(resample_nearest(metres, height, width), intrinsics)
        self._counts.with_3d += 1
        return Frame3D(header.frame_id, points, class_points(seg.labels, points))

    def publish(self, frame: Frame3D, seg: Segmentation, names: Sequence[str], header: Header) -> float:
        """Publish ``~/points`` and ``~/detections_3d`` where subscribed; returns the seconds taken.

        Args:
            frame: the frame's 3D (:meth:`compute`).
            seg: its segmentation.
            names: the first name of each class (class id k: ``names[k - 1]``).
            header: the colour image's header.
        """
        start = time.monotonic()
        if self._points_pub.get_subscription_count() > 0:
            cloud = cloud_points(frame.points, seg.labels, seg.confidence, class_colors(len(names)))
            self._points_pub.publish(cloud_msg(cloud, header))
        if self._detections_pub is not None and self._detections_pub.get_subscription_count() > 0:
            self._detections_pub.publish(detections_msg(frame, seg, names, header))
        return time.monotonic() - start
