"""The command-line tools: ``trident-segment`` (images, videos, bags), ``trident-bench``, ``trident-weights``,
the demo.
"""
