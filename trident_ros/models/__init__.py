"""The three encoders on unmodified upstream libraries, one module per library, and building them.

``clip`` (open_clip), ``dino`` (timm), ``sam`` (segment-anything), ``build`` (which models a
method needs, device and dtype, tiny configurations, :func:`load_models`). These modules import
neither the pipeline nor ROS.
"""
from trident_ros.models.build import TridentModels, encoder_dtype, load_models, resolve_device, tiny_sam
from trident_ros.models.clip import CLIP_MEAN, CLIP_STD, ClipDense, ClipLastBlock
from trident_ros.models.dino import IMAGENET_MEAN, IMAGENET_STD, DinoPatches, interpolate_pos_embed
from trident_ros.models.sam import (
                  SAM_BLOCK_ELEMENTS,
                  SAM_BLOCK_ELEMENTS_CUDA,
                  SAM_ROUND,
                  AttentionObserver,
                  SamChunkedAttention,
                  SamChunkedMlp,
                  SamEncoder,
                  SamImage,
                  use_chunked_blocks,
)

__all__ = [
    'CLIP_MEAN', 'CLIP_STD', 'IMAGENET_MEAN', 'IMAGENET_STD', 'SAM_BLOCK_ELEMENTS', 'SAM_BLOCK_ELEMENTS_CUDA',
    'SAM_ROUND', 'AttentionObserver', 'ClipDense', 'ClipLastBlock', 'DinoPatches', 'SamChunkedAttention',
    'SamChunkedMlp', 'SamEncoder', 'SamImage', 'TridentModels', 'encoder_dtype', 'interpolate_pos_embed',
    'load_models', 'resolve_device', 'tiny_sam', 'use_chunked_blocks',
]
