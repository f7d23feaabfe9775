#!/usr/bin/env python3
"""Added cost of the 3D outputs per frame (``use_depth``), without models or DDS.

    source tools/env.sh
    python bench/depth_bench.py                   # 640x480, 10 classes, 50 runs
    python bench/depth_bench.py --size 1280x720 --classes 50

For one synthetic registered 16UC1 depth (``fake_camera.synthetic_depth``) and a label image of
``--classes`` classes in blocks, it times what the node adds to a frame with depth, stage by stage:
``decode`` (depth message -> array), ``metres`` (scale + invalid -> NaN), ``back_project``,
``class_points`` (per-class median and 5-95 % extent), ``cloud`` (the organized cloud buffer),
``points_msg`` (PointCloud2), ``detections_msg`` (Detection3DArray) and ``masks_3d`` (the 3D
fields of ClassMaskArray: ``class_masks_to_msg`` with points minus without). Prints the median,
90th percentile and minimum (ms) of each and of their sum, and the bytes of one ``~/points``
message. On a shared machine the minimum is the closest to the cost without other load.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from std_msgs.msg import Header

from trident_ros.depth import (
    Intrinsics,
    back_project,
    class_points,
    cloud_points,
    depth_to_metres,
    resample_nearest,
)
from trident_ros.labelling import Segmentation, class_masks
from trident_ros.ros.conversions import array_to_image, class_masks_to_msg
from trident_ros.ros.depth_io import Frame3D, cloud_msg, depth_image_to_array, detections_msg
from trident_ros.ros.fake_camera import synthetic_depth, synthetic_intrinsics
from trident_ros.visualization import class_colors


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', default='640x480', help='WIDTHxHEIGHT of the colour and depth images')
    parser.add_argument('--classes', type=int, default=10, help='vocabulary size (all present)')
    parser.add_argument('--runs', type=int, default=50)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    width, height = (int(v) for v in args.size.lower().split('x'))
    header = Header(frame_id='camera')
    depth = array_to_image(synthetic_depth(height, width), '16UC1', header)
    intrinsics = Intrinsics.from_k(synthetic_intrinsics(height, width), width, height)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, args.classes + 1, (height // 40 + 1, width // 40 + 1)).astype(np.uint8)
    labels = np.ascontiguousarray(np.kron(blocks, np.ones((40, 40), np.uint8))[:height, :width])
    confidence = rng.random((height, width), dtype=np.float32)
    names = [f'class{k}' for k in range(1, args.classes + 1)]
    seg = Segmentation(labels, confidence, class_masks(labels, confidence, names), names)
    colors = class_colors(args.classes)
    times: dict[str, list[float]] = {}
    size = 0
    for _ in range(args.runs):
        stages = {}
        start = time.perf_counter()
        raw = depth_image_to_array(depth)
        stages['decode'] = time.perf_counter()
        metres = resample_nearest(depth_to_metres(raw, 0.001, 0.0, 20.0), height, width)
        stages['metres'] = time.perf_counter()
        points = back_project(metres, intrinsics)
        stages['back_project'] = time.perf_counter()
        classes = class_points(labels, points)
        stages['class_points'] = time.perf_counter()
        cloud = cloud_points(points, labels, confidence, colors)
        stages['cloud'] = time.perf_counter()
        msg = cloud_msg(cloud, header)
        stages['points_msg'] = time.perf_counter()
        detections_msg(Frame3D('camera', points, classes), seg, names, header)
        stages['detections_msg'] = time.perf_counter()
        plain_start = time.perf_counter()
        class_masks_to_msg(seg.masks, names, header)
        plain = time.perf_counter() - plain_start
        with_3d_start = time.perf_counter()
        class_masks_to_msg(seg.masks, names, header, classes, 'camera')
        with_3d = time.perf_counter() - with_3d_start
        previous = start
        for name, stamp in stages.items():
            times.setdefault(name, []).append((stamp - previous) * 1000.0)
            previous = stamp
        times.setdefault('masks_3d', []).append(max(0.0, with_3d - plain) * 1000.0)
        times.setdefault('total', []).append(sum(times[name][-1] for name in [*stages, 'masks_3d']))
        size = len(msg.data)
    print(f'3D outputs, {width}x{height}, {args.classes} classes, {args.runs} runs (ms: median / p90 / min)')
    for name, values in times.items():
        p90 = statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]
        print(f'  {name:15s} {statistics.median(values):7.2f} / {p90:7.2f} / {min(values):7.2f}')
    print(f'~/points message: {size} bytes of data ({size / 2**20:.2f} MiB; 24 bytes a point)')


if __name__ == '__main__':
    main()
