"""The ROS 2 adapter: the lifecycle node, its parameters, topics, workers and health, and the executables' code.

Messages <-> arrays, parameters <-> config, threads and QoS; the segmentation itself is the core's
(:mod:`trident_ros.pipeline`). Importing this package imports no ROS; its modules do.
"""
