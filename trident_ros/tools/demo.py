"""`make demo`: the trident node on the bundled sample images, as a user would run it.

Starts the node as ``trident.launch.py`` would (its plan, :mod:`trident_ros.ros.launch_plan`), without
``launch``: its installed executable, configured and activated over its lifecycle services
(:mod:`trident_ros.ros.node_starter`). Then shows it each sample scene once: sets the scene's vocabulary
(the ``vocabulary`` parameter), waits until ``~/vocabulary_info`` reports it, publishes the scene from
an in-process fake camera (on the launch file's default ``image_topic``) and waits for the results
stamped like that image. Each ``~/segmentation`` overlay is written as ``<scene>_overlay.png`` with a
per-class summary line; then the node is stopped with SIGINT. With real weights missing it stops
before starting the node and names every missing file.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from trident_ros.config import TridentConfig
from trident_ros.models.weights import RANDOM_WEIGHTS_BANNER, WeightsError, fetch_weights
from trident_ros.ros.fake_camera import sample_images
from trident_ros.ros.launch_plan import Plan, plan_launch, profile_environment
from trident_ros.ros.node_starter import StartError, autostart, package_share, start, stop
from trident_ros.vocabulary import parse_vocabulary

SMOKE_COMMAND = 'make demo ARGS=--random-weights'
IMAGE_TOPIC = '/camera/image_raw'  # the launch file's default image_topic
DEPTH_TOPIC = '/camera/depth/image_raw'  # the launch file's default depth_topic, and its camera_info
DEPTH_INFO_TOPIC = '/camera/depth/camera_info'
NODE = '/trident'
RESEND_S = 30.0
"""A scene is published again when no result came back this long after it (a lost best-effort
frame); a result for any of the scene's publications is taken."""
SCENE_VOCABULARIES = {
    'kitchen': 'mug; cup, apple, banana, bottle, plate, table, tiled wall',
    'room': 'door, sofa; couch, window, potted plant, floor, wall',
    'street': 'road, car, tree, building, sky, grass, cloud',
}
"""The vocabulary shown with each bundled scene (``trident_ros/data/<scene>.png``)."""


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m trident_ros.tools.demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--random-weights', action='store_true',
                        help='SMOKE TEST: random weights, no files needed; labels are meaningless')
    parser.add_argument('--tiny', action='store_true', help='with --random-weights: small architectures (fast)')
    parser.add_argument('--vocabulary', default='',
                        help="one vocabulary for every scene instead of each scene's own ('door, sofa; couch')")
    parser.add_argument('--device', default='', help='auto, cpu, cuda or cuda:N (default: the YAML)')
    parser.add_argument('--out', type=Path, default=Path('trident_demo_out'), help='folder for the PNG overlays')
    parser.add_argument('--timeout', type=float, default=900.0, help='seconds before giving up')
    parser.add_argument('--depth', action='store_true',
                        help='use_depth:=true with the fake camera\'s synthetic depth: also a per-class 3D line')
    return parser.parse_args(argv)


def scene_vocabulary(scene: str, override: str = '') -> str:
    """The vocabulary shown with ``scene`` (a file stem): ``override``, else the scene's own.

    Raises:
        DemoError: no override and no vocabulary for that scene.
    """
    if override:
        return override
    if scene not in SCENE_VOCABULARIES:
        raise DemoError(f'no vocabulary for scene {scene!r}: pass --vocabulary')
    return SCENE_VOCABULARIES[scene]


def check_weights(args: argparse.Namespace) -> str | None:
    """None when the node will find its weights (or runs on random ones); else the message."""
    if args.random_weights:
        return None
    try:
        fetch_weights(TridentConfig.from_mapping({'models.device': args.device} if args.device else {}))
    except WeightsError as error:
        return (f'{error}\n\nThe demo needs the weights above. Put them where the message says and run '
                f'`make demo` again, or try the plumbing now with the smoke test (labels are meaningless):\n'
                f'    {SMOKE_COMMAND}')
    return None


def launch_arguments(args: argparse.Namespace, vocabulary: str) -> dict[str, str]:
    """The launch arguments of the node alone (the demo is its camera), starting with the first scene's ``vocabulary``.

    ``ros2 launch trident_ros trident.launch.py`` with these as ``name:=value`` starts the same node.
    """
    values = {'image_topic': IMAGE_TOPIC, 'vocabulary': vocabulary}
    if args.random_weights:
        values['random_weights'] = 'true'
    if args.tiny:
        values['model_scale'] = 'tiny'
    if args.device:
        values['device'] = args.device
    if args.depth:
        values['use_depth'] = 'true'
    return values


def summary_line(scene: str, vocabulary: list[str], msg: Any, image_area: int) -> str:
    """``'street [road, car, sky]: road 41.2% (0.83), sky 30.0% (0.64)'`` from a ClassMaskArray."""
    parts = [f'{m.label} {100.0 * m.area / image_area:.1f}% ({m.score:.2f})'
             for m in sorted(msg.masks, key=lambda m: -m.area)]
    return f'{scene} [{", ".join(vocabulary)}]: ' + (', '.join(parts) if parts else 'nothing labeled')


def summary_3d_line(scene: str, msg: Any) -> str:
    """``'street 3D (camera): road at (0.12, 0.95, 5.98) m, extent 6.1 x 0.3 x 9.4 m, 41234 points; ...'``."""
    parts = [f'{m.label} at ({m.position.x:.2f}, {m.position.y:.2f}, {m.position.z:.2f}) m, extent '
             f'{m.size.x:.1f} x {m.size.y:.1f} x {m.size.z:.1f} m, {m.num_points} points'
             for m in sorted(msg.masks, key=lambda m: -m.num_points) if m.num_points > 0]
    return f'{scene} 3D ({msg.frame_3d or "no depth"}): ' + ('; '.join(parts) if parts else 'no points')


def stamp_key(header: Any) -> tuple[int, int]:
    return header.stamp.sec, header.stamp.nanosec


class SceneRunner:
    """Shows the node one scene at a time and collects its results.

    An in-process fake camera publishes the scenes, a parameter client sets the vocabulary; results
    are matched on the published image's stamp.
    """

    def __init__(self, node_process: subprocess.Popen, deadline: float, depth: bool = False) -> None:
        import rclpy
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import Image

        from trident_ros.msg import ClassMaskArray, VocabularyInfo
        from trident_ros.ros.conversions import image_to_rgb
        from trident_ros.ros.fake_camera import FakeCamera

        self._node_process, self._deadline = node_process, deadline
        self.node = rclpy.create_node('trident_demo')
        camera_args = ['--ros-args', '-r', f'image:={IMAGE_TOPIC}']
        if depth:  # registered depth on the launch file's default depth_topic
            camera_args += ['-r', f'depth:={DEPTH_TOPIC}', '-r', f'depth/camera_info:={DEPTH_INFO_TOPIC}',
                            '-p', 'depth:=true']
        self.camera = FakeCamera(cycle=False, cli_args=camera_args)
        self._executor = SingleThreadedExecutor()
        for node in (self.node, self.camera):
            self._executor.add_node(node)
        self.overlays: dict[tuple[int, int], np.ndarray] = {}
        self.masks: dict[tuple[int, int], Any] = {}
        self.classes: list[str] | None = None
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(
            Image, f'{NODE}/segmentation',
            lambda m: self.overlays.__setitem__(stamp_key(m.header), image_to_rgb(m, 1 << 30)), reliable)
        self.node.create_subscription(ClassMaskArray, f'{NODE}/masks',
                                      lambda m: self.masks.__setitem__(stamp_key(m.header), m), reliable)
        self.node.create_subscription(VocabularyInfo, f'{NODE}/vocabulary_info',
                                      lambda m: setattr(self, 'classes', list(m.classes)), latched)
        self._set_parameters = self.node.create_client(SetParameters, f'{NODE}/set_parameters')

    def close(self) -> None:
        self._executor.shutdown()
        self.camera.destroy_node()
        self.node.destroy_node()

    def spin_until(self, condition: Callable[[], Any], what: str) -> Any:
        """Spin until ``condition()`` is truthy (returned); DemoError at the deadline or if the node exits."""
        while True:
            value = condition()
            if value:
                return value
            if self._node_process.poll() is not None:
                raise DemoError(f'the node exited (code {self._node_process.returncode}) while waiting for {what}')
            if time.monotonic() > self._deadline:
                raise DemoError(f'timed out waiting for {what}')
            self._executor.spin_once(timeout_sec=0.1)

    def wait_ready(self) -> None:
        """The node is active, subscribes to the camera and publishes the outputs the demo reads."""
        self.spin_until(lambda: self.classes is not None and self.camera.subscription_count > 0
                        and self.node.count_publishers(f'{NODE}/masks') > 0
                        and self.node.count_publishers(f'{NODE}/segmentation') > 0, 'the node to become active')

    def set_vocabulary(self, text: str) -> list[str]:
        """Set the node's ``vocabulary`` parameter and wait until it is in force; returns its classes.

        Raises:
            DemoError: the node refused it, or it did not come into force before the deadline.
        """
        from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters

        expected = ['; '.join(names) for names in parse_vocabulary(text).classes]
        self.spin_until(lambda: self._set_parameters.service_is_ready(), f'{NODE}/set_parameters')
        value = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=text)
        future = self._set_parameters.call_async(
            SetParameters.Request(parameters=[Parameter(name='vocabulary', value=value)]))
        self.spin_until(future.done, 'the vocabulary parameter to be set')
        result = future.result().results[0]
        if not result.successful:
            raise DemoError(f'the node refused the vocabulary {text!r}: {result.reason}')
        self.spin_until(lambda: self.classes == expected, f'vocabulary {text!r} in {NODE}/vocabulary_info')
        return expected

    def show(self, index: int, vocabulary: list[str]) -> tuple[np.ndarray, Any]:
        """Publish scene ``index`` until its results are back.

        It is published again every ``RESEND_S`` without a result; the overlay and masks of any of
        its publications, labelled with ``vocabulary``, are taken.

        Returns:
            ``(overlay (H, W, 3) uint8 RGB, ClassMaskArray)``.
        """
        sent: list[tuple[int, int]] = []
        resend_at = 0.0

        def result() -> tuple[np.ndarray, Any] | None:
            nonlocal resend_at
            for key in sent:
                if key in self.overlays and key in self.masks and list(self.masks[key].vocabulary) == vocabulary:
                    return self.overlays[key], self.masks[key]
            if time.monotonic() >= resend_at:
                sent.append(stamp_key(self.camera.publish(index)))
                resend_at = time.monotonic() + RESEND_S
            return None

        found = self.spin_until(result, f'the result of {self.camera.files[index].name}')
        self.overlays.clear()
        self.masks.clear()
        return found


def run_scenes(args: argparse.Namespace, node_process: subprocess.Popen, deadline: float) -> int:
    """Show every sample scene once and write its overlay; returns how many were written."""
    import rclpy

    rclpy.init()
    runner = SceneRunner(node_process, deadline, depth=args.depth)
    written = 0
    try:
        runner.wait_ready()
        for index, path in enumerate(runner.camera.files):
            vocabulary = runner.set_vocabulary(scene_vocabulary(path.stem, args.vocabulary))
            overlay, masks = runner.show(index, vocabulary)
            out = args.out / f'{path.stem}_overlay.png'
            cv2.imwrite(str(out), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
            print(summary_line(path.stem, vocabulary, masks, overlay.shape[0] * overlay.shape[1]), f'-> {out}',
                  flush=True)
            if args.depth:
                print(summary_3d_line(path.stem, masks), flush=True)
            written += 1
    except DemoError as error:
        print(f'demo stopped: {error}', file=sys.stderr)
    finally:
        runner.close()
        rclpy.try_shutdown()
    return written


def run_node(args: argparse.Namespace, plan: Plan, log_path: Path) -> int:
    """Start the planned node, autostart it, show it the scenes, stop it; returns how many overlays were written."""
    deadline = time.monotonic() + args.timeout
    with open(log_path, 'w', encoding='utf-8') as log:  # the node keeps its own descriptor
        processes = start(plan, stdout=log)
    print(f'$ {shlex.join(processes[0].command)}  (log: {log_path})', flush=True)
    try:
        autostart(processes, deadline - time.monotonic())
        return run_scenes(args, processes[0].popen, deadline)
    except StartError as error:
        print(f'demo stopped: {error}', file=sys.stderr)
        return 0
    finally:
        stop(processes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_weights(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.random_weights:
        print(RANDOM_WEIGHTS_BANNER, file=sys.stderr, flush=True)
    scenes = [path.stem for path in sample_images()]
    try:
        first_vocabulary = scene_vocabulary(scenes[0], args.vocabulary)
    except DemoError as error:
        print(error, file=sys.stderr)
        return 2
    share = package_share()
    # this process publishes camera-sized images too: the package's Fast DDS profile unless one is set
    os.environ.update(profile_environment(share, os.environ))
    plan = plan_launch(launch_arguments(args, first_vocabulary), share, os.environ)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / 'node.log'
    written = run_node(args, plan, log_path)
    if written < len(scenes):
        print(f'only {written} of {len(scenes)} scenes came back; see {log_path}', file=sys.stderr)
        print(log_path.read_text(encoding='utf-8')[-3000:], file=sys.stderr)
        return 1
    print(f'{written} overlays written to {args.out}/ (one per scene: {", ".join(scenes)})')
    if args.random_weights:
        print(RANDOM_WEIGHTS_BANNER, file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
