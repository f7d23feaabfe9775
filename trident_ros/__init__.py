"""trident_ros: open-vocabulary semantic segmentation (Trident) for robots.

The core (config, weights, models and the pipeline stages) is pure PyTorch/NumPy and imports no
ROS; only ``node``, ``conversions`` and ``fake_camera`` do.
"""
# The generated interfaces (trident_ros.msg) are installed by colcon into the same package
# directory of the install prefix; extend_path lets them resolve even when this source tree comes
# first on sys.path.
__path__ = __import__('pkgutil').extend_path(__path__, __name__)

__version__ = '0.1.0'
