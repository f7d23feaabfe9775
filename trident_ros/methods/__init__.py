"""The segmentation methods, one module each, and the registry that the pipeline looks them up in."""
