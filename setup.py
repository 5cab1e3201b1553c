"""Packaging for metric_jax."""

import pathlib

from setuptools import find_packages, setup

README = (pathlib.Path(__file__).parent / "README.md").read_text(encoding="utf-8")

setup(
    name="metric_jax",
    version="0.1.0",
    description="Deep metric learning in JAX: losses, miners, evaluation and training.",
    long_description=README,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["metric_jax", "metric_jax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "ml-collections>=1.1.0",
        "absl-py>=2.0",
        "numpy>=2.0",
        "scikit-learn>=1.5",
        "tqdm>=4.60",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "pillow>=10.0",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "pdoc>=15.0",
        ],
        # Side-by-side benchmarks and parity tests against PML only.
        "compare": [
            "torch==2.13.0",
            "pytorch-metric-learning>=2.8",
            "faiss-cpu>=1.8",
        ],
    },
)
