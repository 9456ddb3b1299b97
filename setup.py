"""igpt: train InstructGPT-style language models end to end (pretrain, SFT, reward model, DPO, PPO).

The Triton kernels live in the top-level folder ``kernels/`` and install as the subpackage ``igpt.kernels``. That folder
has no ``__init__.py`` (the package's lives in ``igpt/kernels/``), so that ``import kernels`` from the repository root
finds the unrelated PyPI package ``kernels`` (which transformers imports), never igpt's kernels. Wheels put both in
``igpt/kernels/``; an editable install maps ``igpt.kernels`` to the top-level folder (see docs/internals.md).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """igpt.kernels is built from two folders: its ``__init__.py`` in igpt/kernels/, its modules in kernels/."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "igpt.kernels":
            modules.append((package, "__init__", os.path.join("igpt", "kernels", "__init__.py")))
        return modules


# igpt.eval's metrics and baselines, and the lm-evaluation-harness backend (igpt.lm_eval). lm_eval 0.4.13 needs no
# particular torch: the one the Makefile pins is kept.
EVAL = ["scikit-learn>=1.3", "lm-eval==0.4.13"]

PACKAGES = ["igpt", "igpt.model", "igpt.data", "igpt.stages", "igpt.parallel", "igpt.eval", "igpt.kernels"]

setup(
    name="igpt",
    version="0.1.0",
    description="Train InstructGPT-style language models: pretrain, SFT, RM, DPO, PPO on DDP/FSDP2/ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"igpt": "igpt", "igpt.kernels": "kernels"},
    install_requires=[
        # torch is pinned by the Makefile (2.13.0, the CPU wheel on CPU machines); any 2.x >= 2.6 with FSDP2 works.
        "torch>=2.6",
        "triton>=3.2",
        "hydra-core==1.3.8",
        "omegaconf>=2.3,<2.4",
        "webdataset==1.0.2",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.66",
        "wandb>=0.17",
        "xxhash>=3",  # checkpoint and shard checksums (xxh3_64)
        "deepspeed>=0.16",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "transformers>=4.45", "chatterbot-corpus==1.3.3",
                "hydra-optuna-sweeper>=1.2", "pyarrow>=14", "datasets>=2.16", "psutil>=5.9",
                *EVAL, "accelerate>=1.0"],  # accelerate: lm_eval's hf backend, which the parity test runs
        "demo": ["chatterbot-corpus==1.3.3", *EVAL],
        "eval": EVAL,
        # prepare's parquet files and datasets folders (save_to_disk)
        "data": ["pyarrow>=14", "datasets>=2.16"],
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["igpt-train=igpt.train:main"]},
    cmdclass={"build_py": BuildPy},
)
