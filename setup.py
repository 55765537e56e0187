"""gcvit: GC ViT (Global Context Vision Transformer) with fused Triton (GPU) and C++ (CPU) kernels.

The C++ CPU kernels in csrc/ are compiled with ninja on first use and cached
(see gcvit_kernels/cpu.py), so `pip install -e .` needs no compiler step.
"""
import os

from setuptools import find_packages, setup

setup(
    name="gcvit",
    version="0.1.0",
    description="Global Context Vision Transformer with fused window-attention and Fused-MBConv kernels",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gcvit", "gcvit.*", "gcvit_kernels", "gcvit_kernels.*"]) + ["gcvit_kernels.csrc"],
    # the C++ sources ship inside the package (gcvit_kernels/csrc) so a non-editable install can build them
    package_dir={"gcvit_kernels.csrc": "csrc"},
    package_data={"gcvit_kernels.csrc": ["*.cpp", "*.h"]},
    install_requires=[
        "torch>=2.5",
        "numpy",
        "ninja",
        "safetensors",
        "tqdm",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-benchmark",
            "timm>=1.0.20",
            "torchvision",
            "onnx",
            "onnxruntime",
            "onnxscript",
            "matplotlib",
        ],
    },
    entry_points={"console_scripts": ["gcvit=gcvit.__main__:main"]},
)
