"""`make demo`: the trident node on the bundled sample images, as a user would run it.

Starts ``ros2 launch trident_ros trident.launch.py demo:=true`` (the node + a fake camera that
publishes the sample scenes), waits for a result per sample image, writes each ``~/segmentation``
overlay as a PNG, prints a per-class summary per frame, then stops the launch with SIGINT.
With real weights missing it stops before launching and names every missing file.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from .config import TridentConfig
from .fake_camera import sample_images
from .weights import RANDOM_WEIGHTS_BANNER, WeightsError, fetch_weights

SMOKE_COMMAND = 'make demo ARGS=--random-weights'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m trident_ros.demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--random-weights', action='store_true',
                        help='SMOKE TEST: random weights, no files needed; labels are meaningless')
    parser.add_argument('--tiny', action='store_true', help='with --random-weights: small architectures (fast)')
    parser.add_argument('--vocabulary', default='', help="override the YAML's vocabulary ('door, sofa; couch')")
    parser.add_argument('--device', default='', help='auto, cpu, cuda or cuda:N (default: the YAML)')
    parser.add_argument('--out', type=Path, default=Path('trident_demo_out'), help='folder for the PNG overlays')
    parser.add_argument('--frames', type=int, default=len(sample_images()), help='results to collect')
    parser.add_argument('--timeout', type=float, default=900.0, help='seconds before giving up')
    parser.add_argument('--depth', action='store_true',
                        help='use_depth:=true with the fake camera\'s synthetic depth: also a per-class 3D line')
    return parser.parse_args(argv)


def check_weights(args: argparse.Namespace) -> str | None:
    """None when the node will find its weights (or runs on random ones); else the message."""
    if args.random_weights:
        return None
    try:
        fetch_weights(TridentConfig(**({'device': args.device} if args.device else {})))
    except WeightsError as error:
        return (f'{error}\n\nThe demo needs the weights above. Put them where the message says and run '
                f'`make demo` again, or try the plumbing now with the smoke test (labels are meaningless):\n'
                f'    {SMOKE_COMMAND}')
    return None


def launch_command(args: argparse.Namespace) -> list[str]:
    command = ['ros2', 'launch', 'trident_ros', 'trident.launch.py', 'demo:=true']
    if args.random_weights:
        command.append('random_weights:=true')
    if args.tiny:
        command.append('model_scale:=tiny')
    if args.vocabulary:
        command.append(f'vocabulary:={args.vocabulary}')
    if args.device:
        command.append(f'device:={args.device}')
    if args.depth:
        command.append('use_depth:=true')
    return command


def summary_line(index: int, msg, image_area: int) -> str:
    """'frame 1: wall 41.2% (0.83), door 7.0% (0.64)' from a ClassMaskArray."""
    parts = [f'{m.label} {100.0 * m.area / image_area:.1f}% ({m.score:.2f})'
             for m in sorted(msg.masks, key=lambda m: -m.area)]
    return f'frame {index}: ' + (', '.join(parts) if parts else 'nothing labeled')


def summary_3d_line(index: int, msg) -> str:
    """'frame 1 3D (camera): wall at (0.12, -0.40, 5.98) m, extent 6.1 x 2.3 x 0.4 m, 41234 points; ...'."""
    parts = [f'{m.label} at ({m.position.x:.2f}, {m.position.y:.2f}, {m.position.z:.2f}) m, extent '
             f'{m.size.x:.1f} x {m.size.y:.1f} x {m.size.z:.1f} m, {m.num_points} points'
             for m in sorted(msg.masks, key=lambda m: -m.num_points) if m.num_points > 0]
    return f'frame {index} 3D ({msg.frame_3d or "no depth"}): ' + ('; '.join(parts) if parts else 'no points')


def collect(args: argparse.Namespace, launch: subprocess.Popen) -> int:
    """Receive results until ``args.frames`` distinct stamps were written; returns how many."""
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from .conversions import image_to_rgb
    from .msg import ClassMaskArray

    rclpy.init()
    node = rclpy.create_node('trident_demo')
    overlays: dict[tuple[int, int], np.ndarray] = {}
    masks: dict[tuple[int, int], ClassMaskArray] = {}

    def stamp(header) -> tuple[int, int]:
        return header.stamp.sec, header.stamp.nanosec

    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(Image, '/trident/segmentation',
                             lambda m: overlays.__setitem__(stamp(m.header), image_to_rgb(m, 1 << 30)), qos)
    node.create_subscription(ClassMaskArray, '/trident/masks', lambda m: masks.__setitem__(stamp(m.header), m), qos)
    args.out.mkdir(parents=True, exist_ok=True)
    written: set[tuple[int, int]] = set()
    deadline = time.monotonic() + args.timeout
    try:
        while len(written) < args.frames and time.monotonic() < deadline and launch.poll() is None:
            rclpy.spin_once(node, timeout_sec=0.2)
            for key in sorted(set(overlays) & set(masks) - written):
                written.add(key)
                overlay = overlays[key]
                path = args.out / f'frame_{len(written):03d}_overlay.png'
                cv2.imwrite(str(path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
                print(summary_line(len(written), masks[key], overlay.shape[0] * overlay.shape[1]), f'-> {path}',
                      flush=True)
                if args.depth:
                    print(summary_3d_line(len(written), masks[key]), flush=True)
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return len(written)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_weights(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.random_weights:
        print(RANDOM_WEIGHTS_BANNER, file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / 'launch.log'
    command = launch_command(args)
    print('$ ' + ' '.join(command), f'  (log: {log_path})', flush=True)
    with open(log_path, 'w', encoding='utf-8') as log:
        launch = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            received = collect(args, launch)
        finally:
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGINT)
                try:
                    launch.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(launch.pid, signal.SIGKILL)
                    launch.wait()
    if received < args.frames:
        print(f'only {received} of {args.frames} results arrived; see {log_path}', file=sys.stderr)
        print(log_path.read_text(encoding='utf-8')[-3000:], file=sys.stderr)
        return 1
    print(f'{received} overlays written to {args.out}/')
    if args.random_weights:
        print(RANDOM_WEIGHTS_BANNER, file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
