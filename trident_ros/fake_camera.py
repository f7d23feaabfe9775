"""``ros2 run trident_ros fake_camera [FILE_OR_FOLDER ...]``: image files as a camera.

Publishes ``image`` (sensor_msgs/Image, rgb8; remap it) at ``rate`` Hz, cycling through the
files: the bundled sample scenes (``trident_ros/data``, drawn for this package) unless files or
folders are given as arguments or in the ``files`` parameter. Parameters: ``files`` (string array),
``rate`` (Hz), ``reliability`` (``best_effort`` like most camera drivers, or ``reliable``),
``frame_id``.

Images over ~512 KiB need a Fast DDS profile with a large shared-memory segment in THIS process
(``export FASTDDS_DEFAULT_PROFILES_FILE=.../config/fastdds_large_data.xml`` for Fast DDS 3.x, the same file in
``FASTRTPS_DEFAULT_PROFILES_FILE`` for 2.x on Jazzy/Humble; the launch file and ``tools/env.sh`` set both).
"""
from __future__ import annotations

import itertools
import signal
import sys
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from trident_ros.conversions import array_to_image

SAMPLES_DIR = Path(__file__).resolve().parent / 'data'
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


def load_rgb(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; raises ValueError if the file cannot be read as an image."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f'cannot read an image from {path}')
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class FakeCamera(Node):
    """Publishes image files on ``image`` at a fixed rate."""

    def __init__(self, paths: Sequence[str] = ()) -> None:
        super().__init__('fake_camera')
        files = self.declare_parameter('files', list(paths) or [''], ParameterDescriptor(
            description='image files or folders; empty: the bundled samples')).value
        rate = self.declare_parameter('rate', 2.0, ParameterDescriptor(description='frames per second')).value
        reliability = self.declare_parameter('reliability', 'best_effort', ParameterDescriptor(
            description='best_effort (like camera drivers) or reliable')).value
        self._frame_id = self.declare_parameter('frame_id', 'camera', ParameterDescriptor(
            description='header.frame_id of the images')).value
        if reliability not in RELIABILITY:
            raise ValueError(f'reliability={reliability!r}: must be one of {", ".join(RELIABILITY)}')
        if not rate > 0:
            raise ValueError(f'rate={rate}: must be > 0')
        images = [(path, load_rgb(path)) for path in expand_paths([f for f in files if f])]
        if not images:
            raise ValueError('no images to publish')
        self._images: Iterator[tuple[Path, np.ndarray]] = itertools.cycle(images)
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=RELIABILITY[reliability],
                         durability=DurabilityPolicy.VOLATILE)
        self._pub = self.create_publisher(Image, 'image', qos)
        self._timer = self.create_timer(1.0 / rate, self._publish)
        self.get_logger().info(f'publishing {len(images)} image(s) on {self._pub.topic_name} at {rate:g} Hz '
                               f'({reliability}): {", ".join(p.name for p, _ in images)}')

    def _publish(self) -> None:
        _, rgb = next(self._images)
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self._frame_id)
        self._pub.publish(array_to_image(rgb, 'rgb8', header))


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
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        rclpy.try_shutdown()


if __name__ == '__main__':
    main()
