#!/usr/bin/env python3
"""Where the memory of one full frame goes: a fresh process loads the models (random weights),
encodes a vocabulary, then one frame, and prints the RSS after each stage and its peak during it.

    source tools/env.sh
    python bench/frame_memory.py                      # full-size models, CPU, fp32, 640x480
    python bench/frame_memory.py --sam-upstream       # SAM encoder blocks as segment-anything has them
    python bench/frame_memory.py --release            # RSS follows live memory (glibc, see below)
    python bench/frame_memory.py --bf16               # bfloat16 encoders

Peaks are sampled every 0.5 ms (psutil) and can miss very short ones; the last line is the
kernel's own high-water mark (``ru_maxrss``), which misses nothing. By default glibc keeps freed
blocks (its mmap threshold rises up to 32 MiB as big blocks are freed), so RSS after a stage
includes memory that is free but not returned; ``--release`` makes every block of 64 KiB or more
its own mapping (:func:`trident_ros.tools.measure.release_freed_memory`), as ``MALLOC_MMAP_THRESHOLD_=65536``
in the environment would.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import psutil

PROCESS = psutil.Process()


def mib(value: int) -> str:
    return f'{value / 2**20:8.0f}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', default='640x480', help='generated image WIDTHxHEIGHT')
    parser.add_argument('--tiny', action='store_true', help='small test architectures')
    parser.add_argument('--bf16', action='store_true', help='bfloat16 encoders (default fp32)')
    parser.add_argument('--sam-upstream', action='store_true',
                        help="SAM encoder blocks as segment-anything has them (no chunked attention/MLP)")
    parser.add_argument('--release', action='store_true', help='glibc: return freed memory (RSS ~ live memory)')
    parser.add_argument('--aggregation-chunk', type=int, help='queries per aggregation chunk (default: config)')
    args = parser.parse_args(argv)
    rows: list[tuple[str, float, int, int]] = []

    def stage(name: str, run):
        from trident_ros.tools.measure import PeakRss

        with PeakRss() as peak:
            start = time.perf_counter()
            result = run()
            seconds = time.perf_counter() - start
        rows.append((name, seconds, peak.peak, PROCESS.memory_info().rss))
        return result

    rows.append(('python + numpy + psutil', 0.0, 0, PROCESS.memory_info().rss))
    import torch  # noqa: F401  (measured on its own: the CUDA build maps its libraries at import)
    rows.append(('import torch', 0.0, 0, PROCESS.memory_info().rss))
    from trident_ros.config import TridentConfig
    from trident_ros.pipeline import TridentPipeline
    from trident_ros.tools.measure import BENCH_NAMES, parse_size, release_freed_memory, synthetic_image
    rows.append(('import trident_ros (open_clip, timm, ...)', 0.0, 0, PROCESS.memory_info().rss))
    if args.release and not release_freed_memory():
        parser.error('--release needs glibc')

    config = TridentConfig.from_mapping({'models.random_weights': True, 'models.device': 'cpu',
                                         'models.model_scale': 'tiny' if args.tiny else 'full',
                                         'models.bf16': args.bf16})
    if args.aggregation_chunk is not None:
        config = config.replace({'trident.aggregation_chunk': args.aggregation_chunk})
    pipeline = stage('load models', lambda: TridentPipeline(config))
    if args.sam_upstream:
        undo_chunked_blocks(pipeline)
    parameters = {name: sum(p.numel() * p.element_size() for p in module.parameters())
                  for name, module in (('CLIP', pipeline.models.clip.model), ('DINO', pipeline.models.dino.model),
                                       ('SAM', pipeline.models.sam.model))}
    vocabulary = stage('vocabulary (4 names)', lambda: pipeline.encode_vocabulary(', '.join(BENCH_NAMES)))
    image = synthetic_image(*parse_size(args.size))
    stage('SAM encoder alone', lambda: pipeline.models.sam.encode(image))
    features = stage('encode_image', lambda: pipeline.encode_image(image))
    pipeline.apply_label_config(config.replace({'refinement.refine': False}))
    stage('label, refine off', lambda: pipeline.label(features, vocabulary))
    pipeline.apply_label_config(config.replace({'refinement.refine': True}))
    segmentation = stage('label, refine on', lambda: pipeline.label(features, vocabulary))

    chunk = config.section('trident').aggregation_chunk
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, {args.size}, '
          f'{"tiny" if args.tiny else "full"} models, SAM blocks {"upstream" if args.sam_upstream else "chunked"}, '
          f'aggregation chunk {chunk}, glibc release {"on" if args.release else "off"}, '
          f'{"bf16" if args.bf16 else "fp32"}')
    print('parameters: ' + ', '.join(f'{name} {value / 2**20:.0f} MiB' for name, value in parameters.items()))
    print(f'\n{"stage":<42}{"seconds":>8}{"peak MiB":>10}{"after MiB":>10}')
    for name, seconds, peak, after in rows:
        print(f'{name:<42}{seconds:8.2f}{mib(peak) if peak else "":>10}{mib(after):>10}')
    print('\nimage-side stages: ' + ', '.join(f'{k} {v:.2f} s' for k, v in segmentation.timings.items()))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f'peak RSS of the process (ru_maxrss): {maxrss / 2**20:.0f} MiB = {maxrss / 2**30:.2f} GiB '
          f'= {maxrss / 1e9:.2f} GB')
    return 0


def undo_chunked_blocks(pipeline) -> None:
    """Give the pipeline a SAM encoder whose blocks are segment-anything's own modules, with the
    same weights (for before/after comparisons), except the last block's attention, which hands
    its rows to the aggregation (``SamEncoder`` puts a chunked one back there).
    """
    from segment_anything.modeling.common import MLPBlock
    from segment_anything.modeling.image_encoder import Attention

    from trident_ros.models import SamEncoder

    model = pipeline.models.sam.model
    for block in model.image_encoder.blocks:
        chunked_attn, chunked_mlp = block.attn, block.mlp
        dim = chunked_attn.qkv.in_features
        size = ((chunked_attn.rel_pos_h.shape[0] + 1) // 2, (chunked_attn.rel_pos_w.shape[0] + 1) // 2)
        attn = Attention(dim, num_heads=chunked_attn.num_heads, use_rel_pos=True, input_size=size)
        attn.load_state_dict(chunked_attn.state_dict())
        mlp = MLPBlock(chunked_mlp.lin1.in_features, chunked_mlp.lin1.out_features, act=type(chunked_mlp.act))
        mlp.load_state_dict(chunked_mlp.state_dict())
        block.attn, block.mlp = attn.eval().requires_grad_(False), mlp.eval().requires_grad_(False)
    pipeline.models.sam = SamEncoder(model, chunked=False)


if __name__ == '__main__':
    sys.exit(main())
