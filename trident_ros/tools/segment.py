"""`trident-segment`: segment images, folders of images, a video file or a recorded bag with an open vocabulary.

For every input frame it writes ``<name>_overlay.png`` (class colours + legend), ``<name>_labels.png``
(0 = unlabeled, class_id = vocabulary index + 1; 16-bit past 255 classes) and ``<name>_masks.json``
(per-class label, class_id, score, area, bbox), and logs a per-class summary.

A rosbag2 bag (sqlite3 or MCAP) with ``--topic`` is labelled into a new bag (``<prefix>/labels``,
``/confidence``, ``/masks``, optionally ``/segmentation``) at the input's stamps:
``trident-segment run1/ --topic /camera/color/image_raw -v 'door, stairs, person' -o run1_labeled/``.
Several bags, or folders searched for bags, go to ``-o DIR/<bag path>/`` with a manifest
``DIR/trident-fleet.json``: one after another here, or on a Ray cluster with ``--ray``
(``pip install 'trident_ros[fleet]'``): ``trident-segment bags/ --topic ... -o labelled/ --ray auto``.
Exit status: 0 done, 1 a bag failed (the others finish), 2 bad configuration, 130 interrupted (--resume).
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from trident_ros.config import BACKENDS, ConfigError, TridentConfig
from trident_ros.labelling import Segmentation
from trident_ros.models.weights import RANDOM_WEIGHTS_BANNER, WeightsError
from trident_ros.vocabulary import VocabularyError

logger = logging.getLogger('trident_ros.tools.segment')

IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp'}
VIDEO_SUFFIXES = {'.mp4', '.avi', '.mov', '.mkv', '.webm'}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='trident-segment', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', nargs='*', type=Path, help='image files, folders of images, or video files')
    parser.add_argument('-v', '--vocabulary',
                        help="classes separated by ',', synonyms of a class by ';' (e.g. 'sofa; couch, door')")
    parser.add_argument('-o', '--output', type=Path,
                        help='output folder (default trident_out; for a bag: <bag>_labeled, a new bag)')
    parser.add_argument('--config', type=Path,
                        help='YAML of TridentConfig sections or dotted names (or a ROS params file)')
    parser.add_argument('--print-config', action='store_true',
                        help='print the configuration that would run (every dotted name, as YAML) and exit')
    parser.add_argument('--device', help='auto, cpu, cuda or cuda:N (overrides the config)')
    parser.add_argument('--method',
                        help='a registered method: trident (default, most accurate) ... maskclip (fastest, CLIP only); '
                             'docs/methods.md. Modules named in TRIDENT_METHOD_MODULES may register more')
    parser.add_argument('--no-refine', action='store_true', help='skip SAM refinement')
    parser.add_argument('--bf16', action='store_true',
                        help='bfloat16 encoders on the CPU (about 2x faster with AVX512-BF16/AMX; close to fp32)')
    parser.add_argument('--backend', choices=BACKENDS,
                        help="torch, or onnxruntime: the method's exported graphs (trident-export) via ONNX Runtime")
    parser.add_argument('--engine-cache-dir', help='graphs and TensorRT engines (default: weights_dir/engines)')
    parser.add_argument('--video-stride', type=int, default=1, help='use every Nth video frame')
    bag = parser.add_argument_group('recorded bags (rosbag2, sqlite3 or MCAP)')
    bag.add_argument('--topic', help='image topic of the bag (sensor_msgs/Image or CompressedImage)')
    bag.add_argument('--prefix', default='/trident', help='namespace of the output topics (default /trident)')
    bag.add_argument('--every', type=int, default=1, help='label every Nth image of the topic')
    bag.add_argument('--start', type=float, help='seconds from the start of the bag')
    bag.add_argument('--end', type=float, help='seconds from the start of the bag (exclusive)')
    bag.add_argument('--segmentation', action='store_true', help='also write <prefix>/segmentation (overlays)')
    bag.add_argument('--png', type=Path, help='also write an overlay and a label PNG per frame into this folder')
    bag.add_argument('--storage', choices=('sqlite3', 'mcap'), help="output bag storage (default: the input's)")
    bag.add_argument('--resume', action='store_true', help='continue an interrupted run into the same output')
    bag.add_argument('--max-frames', type=int, help='stop after labelling this many frames (resume later)')
    bag.add_argument('--checkpoint', type=int, default=50,
                     help='frames per closed part of the output (at most this many are redone after a kill)')
    fleet = parser.add_argument_group('several bags (-o DIR/<bag path>/, DIR/trident-fleet.json), on Ray or here')
    fleet.add_argument('--ray', metavar='auto|local|ADDRESS',
                       help='label on a Ray cluster: auto (RAY_ADDRESS or a local `ray start`), local (a private '
                            'instance), or the head address; needs the fleet extra')
    fleet.add_argument('--workers', metavar='MIN[:MAX]',
                       help='Ray workers, each with its own pipeline (default: 1 up to what the cluster fits)')
    fleet.add_argument('--gpus-per-worker', type=float,
                       help='GPUs per worker, fractions share a GPU (default 1 on a cluster with GPUs, else 0)')
    fleet.add_argument('--cpus-per-worker', type=float, default=1.0,
                       help='CPUs per worker, also its thread count (default 1)')
    fleet.add_argument('--verbose', action='store_true', help="Ray Data's progress bars and the workers' logs")
    parser.add_argument('--random-weights', action='store_true',
                        help='SMOKE TEST: random weights, no files needed; labels are meaningless')
    parser.add_argument('--tiny', action='store_true',
                        help='with --random-weights: small test architectures (seconds on a CPU)')
    args = parser.parse_args(argv)
    if not args.print_config and not (args.inputs and args.vocabulary):
        parser.error('the inputs and -v/--vocabulary are required (unless --print-config)')
    return args


def build_config(args: argparse.Namespace) -> TridentConfig:
    """The file's names, then the options (:meth:`TridentConfig.from_mapping`: the method's preset fills in what
    neither gives, as for the node).
    """
    changes: dict[str, object] = {}
    if args.device:
        changes['models.device'] = args.device
    if args.method:
        changes['method'] = args.method
    if args.no_refine:
        changes['refinement.refine'] = False
    if args.bf16:
        changes['models.bf16'] = True
    if args.backend:
        changes['models.backend'] = args.backend
    if args.engine_cache_dir:
        changes['models.engine_cache_dir'] = args.engine_cache_dir
    return config_from(args, changes)


def config_from(args: argparse.Namespace, changes: dict[str, object]) -> TridentConfig:
    """``--config``'s file (if given) with ``changes`` and the smoke options (``--random-weights``, ``--tiny``) over
    it; the method's preset fills in what none of them gives. Shared by the commands that load models.
    """
    if args.random_weights:
        changes['models.random_weights'] = True
    if args.tiny:
        if not args.random_weights:
            raise ConfigError('--tiny needs --random-weights (tiny architectures have no trained weights)')
        changes['models.model_scale'] = 'tiny'
    return TridentConfig.from_yaml(args.config, changes) if args.config else TridentConfig.from_mapping(changes)


def iter_frames(inputs: list[Path], video_stride: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, (H, W, 3) uint8 RGB) for every image file and video frame among ``inputs``."""
    for path in inputs:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            yield from iter_frames(files, video_stride)
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            capture = cv2.VideoCapture(str(path))
            index = 0
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                if index % video_stride == 0:
                    yield f'{path.stem}_{index:06d}', cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                index += 1
            capture.release()
        else:
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is None:
                logger.warning('skipping %s: not a readable image', path)
                continue
            yield path.stem, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def count_frames(inputs: list[Path], video_stride: int) -> int | None:
    total = 0
    for path in inputs:
        if path.is_dir():
            total += sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            capture = cv2.VideoCapture(str(path))
            frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            capture.release()
            total += (frames + video_stride - 1) // video_stride
        else:
            total += 1
    return total or None


def write_outputs(output: Path, name: str, image: np.ndarray, segmentation: Segmentation) -> None:
    """Write the overlay PNG, the label PNG and the per-class JSON of one frame."""
    overlay_rgb = segmentation.overlay(image)
    cv2.imwrite(str(output / f'{name}_overlay.png'), cv2.cvtColor(overlay_rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(output / f'{name}_labels.png'), segmentation.labels)
    summary = {
        'image': name,
        'size': list(segmentation.labels.shape),
        'vocabulary': segmentation.vocabulary,
        'masks': [{'label': m.label, 'class_id': m.class_id, 'score': round(float(m.score), 4), 'area': int(m.area),
                   'bbox': [int(v) for v in m.bbox]} for m in segmentation.masks],
        'timings_s': {k: round(v, 4) for k, v in segmentation.timings.items()},
    }
    (output / f'{name}_masks.json').write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding='utf-8')


def summarize(name: str, segmentation: Segmentation) -> str:
    total = segmentation.labels.size
    parts = [f'{m.label} {100.0 * m.area / total:.1f}% (score {m.score:.2f})' for m in segmentation.masks]
    return f'{name}: ' + (', '.join(parts) if parts else 'nothing labeled')


def bag_to_label(args: argparse.Namespace) -> Path | None:
    """The one rosbag2 bag to label alone (a folder with metadata.yaml), or None for images, videos and fleets.

    Raises:
        ConfigError: a bag without ``--topic``.
    """
    bags = [path for path in args.inputs if path.is_dir() and (path / 'metadata.yaml').is_file()]
    if args.topic is None:
        if bags:
            raise ConfigError(f'{bags[0]} is a rosbag2 bag: pass --topic with its image topic')
        return None
    return bags[0] if len(args.inputs) == 1 and bags and args.ray is None else None


def bag_options(args: argparse.Namespace) -> Any:
    """The bag options of the command line (:class:`~trident_ros.tools.bags.BagOptions`), for one bag or many."""
    from trident_ros.tools.bags import BagOptions

    return BagOptions(topic=args.topic, vocabulary=args.vocabulary, prefix=args.prefix, every=args.every,
                      start=args.start, end=args.end, segmentation=args.segmentation, storage=args.storage)


def label_fleet(args: argparse.Namespace, config: TridentConfig) -> int:
    """Run :func:`fleet.label_bags` for the command line; the exit status."""
    from trident_ros.tools.fleet import RaySettings, label_bags

    if args.output is None:
        raise ConfigError('several bags (or --ray) need -o DIR: each bag goes to DIR/<bag path>/')
    if args.max_frames is not None:
        raise ConfigError('--max-frames labels one bag: with several bags or --ray, stop with Ctrl-C and --resume')
    ray = None
    if args.ray is not None:
        low, colon, high = (args.workers or '1:').partition(':')
        try:
            workers = (int(low), int(high) if high else None if colon else int(low))
        except ValueError as error:
            raise ConfigError(f'--workers {args.workers}: expected MIN or MIN:MAX') from error
        ray = RaySettings(address=args.ray, workers=workers, gpus_per_worker=args.gpus_per_worker,
                          cpus_per_worker=args.cpus_per_worker, verbose=args.verbose)
    options = bag_options(args)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # parts are kept as for Ctrl-C
    try:
        result = label_bags(args.inputs, args.output, options, config, ray=ray, checkpoint=args.checkpoint,
                            resume=args.resume, png_dir=args.png)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.interrupted:
        logger.warning('interrupted: the published shards are kept in %s; run the same command with --resume '
                       'to continue', args.output)
        return 130
    done = sum(bag.complete for bag in result.bags.values())
    logger.info('%d of %d bag(s) complete -> %s (%s)', done, len(result.bags), args.output,
                args.output / 'trident-fleet.json')
    for name, error in result.errors.items():
        logger.error('%s: %s', name, error)
    return 1 if result.errors else 0


def label_recorded_bag(args: argparse.Namespace, pipeline: Any, vocabulary: Any, bag: Path) -> int:
    """Run :func:`bag_labelling.label_bag` for the command line; the exit status."""
    from trident_ros.tools.bags import BagError, label_bag

    output = args.output or bag.with_name(bag.name.rstrip('/') + '_labeled')
    options = bag_options(args)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # closes the output as Ctrl-C does
    try:
        result = label_bag(pipeline, vocabulary, bag, output, options, resume=args.resume,
                           max_frames=args.max_frames, png_dir=args.png, checkpoint=args.checkpoint)
    except BagError as error:
        logger.error('%s', error)
        return 1
    except KeyboardInterrupt:
        logger.warning('interrupted: the frames labelled so far are in %s; run the same command with --resume '
                       'to continue', output)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    per_frame = result.seconds / result.labelled if result.labelled else 0.0
    logger.info('%s: %d frame(s) selected, %d labelled (%.3f s/frame), %d already labelled, %d refused -> %s',
                args.topic, result.selected, result.labelled, per_frame, result.resumed, result.refused, output)
    if not result.complete:
        logger.info('stopped at --max-frames %d: run the same command with --resume to continue', args.max_frames)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format='[%(levelname)s] %(name)s: %(message)s')
    args = parse_args(argv)
    try:
        config = build_config(args)
        if args.print_config:
            import yaml

            sys.stdout.write(yaml.safe_dump(config.flat(), sort_keys=False))
            return 0
        bag = bag_to_label(args)
        if args.topic is not None and bag is None:
            if config.models.random_weights:
                logger.warning(RANDOM_WEIGHTS_BANNER)
            return label_fleet(args, config)
        if config.models.random_weights:
            logger.warning(RANDOM_WEIGHTS_BANNER)
        from trident_ros.pipeline import TridentPipeline

        pipeline = TridentPipeline(config)
        logger.info('%s', pipeline.describe())
        vocabulary = pipeline.encode_vocabulary(args.vocabulary)
    except (ConfigError, WeightsError, VocabularyError) as error:
        logger.error('%s', error)
        return 2
    for warning in vocabulary.warnings:
        logger.warning('vocabulary: %s', warning)
    if bag is not None:
        return label_recorded_bag(args, pipeline, vocabulary, bag)
    args.output = args.output or Path('trident_out')
    args.output.mkdir(parents=True, exist_ok=True)
    frames = 0
    total = count_frames(args.inputs, args.video_stride)
    for name, image in tqdm(iter_frames(args.inputs, args.video_stride), total=total, unit='frame', disable=None):
        segmentation = pipeline.label(pipeline.encode_image(image), vocabulary)
        write_outputs(args.output, name, image, segmentation)
        logger.info('%s', summarize(name, segmentation))
        frames += 1
    if frames == 0:
        logger.error('no readable image or video frame in %s', ', '.join(map(str, args.inputs)))
        return 1
    logger.info('wrote %d frame(s) to %s', frames, args.output)
    if config.models.random_weights:
        logger.warning(RANDOM_WEIGHTS_BANNER)
    return 0


if __name__ == '__main__':
    sys.exit(main())
