"""Exported encoder graphs and their runtime (``models.backend: onnxruntime``).

``graphs`` (the per-frame encoder graphs as torch modules on the loaded models), ``export`` (ONNX files in the
engine cache, named by their key), ``onnx_runtime`` (ONNX Runtime sessions with the TensorRT, CUDA or CPU provider).
Methods reach the open graphs through ``Frame.graphs``/``Labelling.graphs``; this room imports no method.
"""
