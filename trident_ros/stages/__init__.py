"""Building blocks of the methods: windows, splicing, SAM aggregation and refinement, CLIP attention rules, PAMR.

Each stage is a function or small class on tensors; stages import ``models`` and each other, never
``methods`` or ``pipeline``.
"""
