"""pip-installable core library and command-line tools (no ROS needed).

ROS users build this package with colcon (ament_cmake, see CMakeLists.txt); this file serves
`pip install .` for the core (`import trident_ros.pipeline`, `trident-segment`, `trident-bench`, `trident-weights`).
"""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name='trident_ros',
    version='0.1.0',
    description='Training-free open-vocabulary semantic segmentation (Trident) for robots',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['trident_ros', 'trident_ros.*']),  # every room, new ones included
    package_data={'trident_ros': ['data/*.png']},
    # the message definitions, read at run time by bag_labelling (rosbags' typestore)
    data_files=[('share/trident_ros/msg', sorted(str(p) for p in Path('msg').glob('*.msg')))],
    install_requires=[
        'torch>=2.1',
        'torchvision>=0.16',
        'open_clip_torch>=2.23',
        'timm>=0.9.16',
        'segment-anything>=1.0',
        'numpy>=1.23',
        'opencv-python-headless>=4.8',
        'tqdm>=4.60',
        'pillow>=9.0',
        'PyYAML>=6.0',
        'rosbags>=0.10',
        'rosbags-image>=0.9',  # raw image messages of bags (image_decoding)
        'huggingface_hub>=0.23',  # weight downloads (models/weight_files.py); timm and open_clip need it too
    ],
    extras_require={
        'test': ['pytest>=8,<9', 'psutil'],
        'onnx': ['onnx>=1.17', 'onnxruntime>=1.20', 'onnxslim>=0.1.40'],  # trident-export, backend: onnxruntime
        'fleet': ['ray[data]>=2.50'],  # trident-segment --ray: bags on a Ray cluster
    },
    entry_points={
        'console_scripts': [
            'trident-segment = trident_ros.tools.segment:main',
            'trident-bench = trident_ros.tools.bench:main',
            'trident-weights = trident_ros.tools.fetch_weights:main',
            'trident-export = trident_ros.tools.export:main',
        ],
    },
)
