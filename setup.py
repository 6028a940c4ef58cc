"""Build and install rmda-fused."""
from setuptools import find_packages, setup

setup(
    name="rmda-fused",
    version="0.1.0",
    description="RMDA (Huang & Lee, ICLR 2022) as a fused PyTorch optimizer for structured sparsity",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the Triton kernels live at top level (kernels/) and install as rmda_fused.kernels
    packages=find_packages(include=["rmda_fused", "rmda_fused.*"]) + ["rmda_fused.kernels"],
    package_dir={"rmda_fused.kernels": "kernels"},
    install_requires=["torch>=2.4", "tqdm", "scikit-learn"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "matplotlib", "torchvision"],
        "bench": ["pytest-benchmark", "matplotlib", "torchvision"],
    },
)
