"""`trident-weights fetch` (`ros2 run trident_ros fetch_weights`): SAM, CLIP and DINO into one folder.

    trident-weights fetch                                  # the default models into ~/.cache/trident_ros
    trident-weights fetch --config config/trident.yaml --weights-dir /data/weights
    trident-weights fetch --print                          # list URLs, files, SHA-256s (to fetch elsewhere)

Downloads the weight files of the configured models that are not in the weights folder yet and verifies
those already there. Downloads go through huggingface_hub: hub files (CLIP, DINO) as ``hf_hub_download``
fetches them (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, its cache), SAM's file into ``.<name>.part``, which the
next run resumes; a dropped connection is resumed at once; progress bar, SHA-256 checked where published,
atomic rename. Afterwards
``trident-segment`` and the node find every file in that folder by its standard name: nothing else
to set (``weights_dir`` in the config or as a node parameter when it is not the default folder).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trident_ros.config import ConfigError, TridentConfig
from trident_ros.models.weights import (
    WeightsError,
    fetch_files,
    fetch_weights,
    format_weights,
    needed_weights,
    weights_dir,
)

logger = logging.getLogger('trident_ros.tools.fetch_weights')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='trident-weights', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    fetch = commands.add_parser('fetch', help='download the configured models\' weights into the weights folder')
    fetch.add_argument('--config', type=Path,
                       help='YAML of TridentConfig sections or dotted names (or a ROS params file)')
    fetch.add_argument('--weights-dir', help='the weights folder (default: the config\'s, else ~/.cache/trident_ros)')
    fetch.add_argument('--method', help='fetch what this method needs (default: the config\'s)')
    fetch.add_argument('--print', action='store_true', dest='print_only',
                       help='only print the URLs, file names, paths and SHA-256s; download nothing')
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> TridentConfig:
    """The configuration whose weights are fetched: ``--config`` (or the defaults) with the options applied."""
    config = TridentConfig.from_yaml(args.config) if args.config else TridentConfig.from_mapping({})
    options = {'models.weights_dir': args.weights_dir, 'method': args.method}
    return config.replace({name: value for name, value in options.items() if value})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='[%(levelname)s] %(name)s: %(message)s')
    logging.getLogger('trident_ros').setLevel(logging.INFO)  # ours; the HTTP libraries' requests are not news
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as error:
        logger.error('%s', error)
        return 2
    entries = needed_weights(config)
    folder = weights_dir(config)
    if args.print_only:
        print(f'# weight files of method {config.method}, into {folder}:')
        print(format_weights(entries))
        return 0
    try:
        for path, state in fetch_files(entries).items():
            logger.info('%s: %s', state, path)
        sources = fetch_weights(config.replace({'models.download': False}))
    except WeightsError as error:
        logger.error('%s', error)
        return 1
    logger.info('all weights of method %s are in place: %s', config.method, sources.describe(config))
    return 0


if __name__ == '__main__':
    sys.exit(main())
