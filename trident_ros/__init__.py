"""trident_ros: open-vocabulary semantic segmentation (Trident) for robots.

Rooms, each importing only the ones before it (``docs/architecture.md``): ``models`` (the encoders,
one module per upstream library, and their weight files) -> ``stages`` (building blocks) ->
``methods`` (one module per method, and the registry) -> the core API (``pipeline``, ``config``,
``vocabulary``, ``labelling``, ``visualization``, ``depth``) -> ``ros`` (the ROS 2 node) and
``tools`` (command-line tools). Everything before ``ros`` imports no ROS.
"""
# The generated interfaces (trident_ros.msg) are installed by colcon into the same package
# directory of the install prefix; extend_path lets them resolve even when this source tree comes
# first on sys.path.
__path__ = __import__('pkgutil').extend_path(__path__, __name__)

__version__ = '0.1.0'
