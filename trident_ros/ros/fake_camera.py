"""``ros2 run trident_ros fake_camera [FILE_OR_FOLDER ...]``: image files as a camera.

Publishes ``image`` (sensor_msgs/Image, rgb8; remap it) at ``rate`` Hz, cycling through the
files: the bundled sample scenes (``trident_ros/data``, drawn for this package) unless files or
folders are given as arguments or in the ``files`` parameter. Parameters: ``files`` (string array),
``rate`` (Hz), ``reliability`` (``best_effort`` like most camera drivers, or ``reliable``),
``frame_id``, ``depth``. :class:`FakeCamera` with ``cycle=False`` publishes only when
:meth:`FakeCamera.publish` is called (the demo shows each scene once and waits for its result).

``depth:=true`` also publishes, with the same stamp and frame, a synthetic REGISTERED depth image
``depth`` (16UC1 millimetres) and ``depth/camera_info`` of a scene with known geometry
(:func:`synthetic_depth`): a floor 1 m below the camera, a back wall at 6 m and two boxes whose
front faces are at 2 m and 3.5 m, with an 8-pixel strip of invalid depth (0) at the left edge.

Images over ~512 KiB need a Fast DDS profile with a large shared-memory segment in THIS process
(``export FASTDDS_DEFAULT_PROFILES_FILE=.../config/fastdds_large_data.xml`` for Fast DDS 3.x, the same file in
``FASTRTPS_DEFAULT_PROFILES_FILE`` for 2.x on Jazzy/Humble; the launch file and ``tools/env.sh`` set both).
"""
from __future__ import annotations

import itertools
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from trident_ros.ros.conversions import array_to_image

SAMPLES_DIR = Path(__file__).resolve().parents[1] / 'data'
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
RELIABILITY = {'best_effort': ReliabilityPolicy.BEST_EFFORT, 'reliable': ReliabilityPolicy.RELIABLE}


def sample_images() -> list[Path]:
    """The bundled sample scenes (640x480 PNG)."""
    return sorted(SAMPLES_DIR.glob('*.png'))


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """Files as given, folders replaced by the image files in them (sorted); nothing given: the samples."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found if paths else sample_images()


CAMERA_HEIGHT_M = 1.0  # the floor is this far below the optical centre (optical y points down)
WALL_M = 6.0
BOXES_M = ((0.15, 0.35, 0.45, 0.80, 2.0), (0.60, 0.80, 0.35, 0.65, 3.5))
"""(left, right, top, bottom) as fractions of the image width/height, and the face's depth in metres."""
INVALID_COLUMNS = 8


def synthetic_intrinsics(height: int, width: int) -> list[float]:
    """Row-major 3x3 camera matrix of the synthetic camera: fx != fy, principal point off-centre."""
    fx, fy = 525.0 * width / 640.0, 500.0 * height / 480.0
    cx, cy = width / 2.0 - 0.5 + 8.0 * width / 640.0, height / 2.0 - 0.5 - 6.0 * height / 480.0
    return [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]


def synthetic_depth(height: int, width: int) -> np.ndarray:
    """``(height, width)`` uint16 depth in millimetres of the known scene (see the module docstring).

    Below the horizon the floor (``z = CAMERA_HEIGHT_M * fy / (v - cy)``), up to the wall at
    ``WALL_M``; the boxes' fronts at their fixed depths; 0 (no depth) in the left ``INVALID_COLUMNS``.
    """
    k = synthetic_intrinsics(height, width)
    fy, cy = k[4], k[5]
    rows = np.arange(height, dtype=np.float64) - cy
    with np.errstate(divide='ignore'):
        floor = np.where(rows > 0, CAMERA_HEIGHT_M * fy / np.maximum(rows, 1e-9), np.inf)
    metres = np.repeat(np.minimum(floor, WALL_M)[:, None], width, axis=1)
    for left, right, top, bottom, depth in BOXES_M:
        metres[int(top * height):int(bottom * height), int(left * width):int(right * width)] = depth
    depth_mm = np.rint(metres * 1000.0).astype(np.uint16)
    depth_mm[:, :INVALID_COLUMNS] = 0
    return depth_mm


def load_rgb(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; raises ValueError if the file cannot be read as an image."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f'cannot read an image from {path}')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class FakeCamera(Node):
    """Publishes image files on ``image`` at a fixed rate, or one at a time on request.

    Args:
        paths: image files or folders (the ``files`` parameter overrides them); none: the samples.
        cycle: publish at ``rate`` Hz, cycling through the files; False: only when :meth:`publish`
            is called.
        node_options: passed to rclpy's ``Node`` (e.g. ``cli_args`` remapping ``image``).

    Raises:
        ValueError: a bad parameter or no readable image.
    """

    def __init__(self, paths: Sequence[str] = (), cycle: bool = True, **node_options: Any) -> None:
        super().__init__('fake_camera', **node_options)
        files = self.declare_parameter('files', list(paths) or [''], ParameterDescriptor(
            description='image files or folders; empty: the bundled samples')).value
        rate = self.declare_parameter('rate', 2.0, ParameterDescriptor(description='frames per second')).value
        reliability = self.declare_parameter('reliability', 'best_effort', ParameterDescriptor(
            description='best_effort (like camera drivers) or reliable')).value
        self._frame_id = self.declare_parameter('frame_id', 'camera', ParameterDescriptor(
            description='header.frame_id of the images')).value
        self._depth = self.declare_parameter('depth', False, ParameterDescriptor(
            description='also publish a synthetic registered depth (16UC1 mm) and its camera_info')).value
        if reliability not in RELIABILITY:
            raise ValueError(f'reliability={reliability!r}: must be one of {", ".join(RELIABILITY)}')
        if not rate > 0:
            raise ValueError(f'rate={rate}: must be > 0')
        images = [(path, load_rgb(path)) for path in expand_paths([f for f in files if f])]
        if not images:
            raise ValueError('no images to publish')
        self.files: list[Path] = [path for path, _ in images]
        """The files published, in order (``publish(index)`` publishes ``files[index]``)."""
        self._images = [rgb for _, rgb in images]
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=RELIABILITY[reliability],
                         durability=DurabilityPolicy.VOLATILE)
        self._pub = self.create_publisher(Image, 'image', qos)
        if self._depth:
            self._depth_pub = self.create_publisher(Image, 'depth', qos)
            self._info_pub = self.create_publisher(CameraInfo, 'depth/camera_info', qos)
        if cycle:
            indices = itertools.cycle(range(len(images)))
            self._timer = self.create_timer(1.0 / rate, lambda: self.publish(next(indices)))
        when = f'at {rate:g} Hz' if cycle else 'on request'
        self.get_logger().info(f'publishing {len(images)} image(s) on {self._pub.topic_name} {when} '
                               f'({reliability}): {", ".join(p.name for p in self.files)}')

    @property
    def subscription_count(self) -> int:
        """Subscriptions matched to ``image``."""
        return self._pub.get_subscription_count()

    def publish(self, index: int) -> Header:
        """Publish ``files[index]`` now, stamped with the node's clock; returns the header sent."""
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self._frame_id)
        rgb = self._images[index]
        if self._depth:  # first, so that the depth is there when the image's result is published
            height, width = rgb.shape[:2]
            self._depth_pub.publish(array_to_image(synthetic_depth(height, width), '16UC1', header))
            fx, _, cx, _, fy, cy = synthetic_intrinsics(height, width)[:6]
            self._info_pub.publish(CameraInfo(
                header=header, height=height, width=width, distortion_model='plumb_bob', d=[0.0] * 5,
                k=[fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0], r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                p=[fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]))
        self._pub.publish(array_to_image(rgb, 'rgb8', header))
        return header


def main(args: list[str] | None = None) -> None:
    # rclpy handles the first signal and restores these at shutdown: the second SIGINT of a Ctrl-C
    # under `ros2 launch` (terminal and launch both signal) must not kill the exiting process
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    try:
        rclpy.init(args=args)
        try:
            node = FakeCamera(remove_ros_args(args)[1:])
        except ValueError as error:
            rclpy.logging.get_logger('fake_camera').error(str(error))
            sys.exit(1)
        try:
            rclpy.spin(node)
        except Exception:
            if rclpy.ok():
                raise
            # else a signal shut the context down while the executor built its wait set
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
