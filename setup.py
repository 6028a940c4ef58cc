"""Build and install rmda-fused.

The C++ (and, where CUDA is present, CUDA) kernels are built as ``rmda_fused._C``; the
recipe lives in rmda_fused/_extension.py, shared with the run-time JIT build. torch must be
importable while building, so install without build isolation:
``pip install --no-build-isolation .`` (or ``-e .``); pyproject.toml names the build
requirements. The kernel sources also ship inside the package (``rmda_fused/csrc``) for the
JIT fallback.
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _extension_recipe():
    # loaded by path: importing the rmda_fused package here would need its dependencies
    path = Path(__file__).resolve().parent / "rmda_fused" / "_extension.py"
    spec = importlib.util.spec_from_file_location("_rmda_fused_extension_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ext_modules():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "rmda_fused: torch is not importable in this build environment, so the C++ kernels "
            "are not built now; they compile on first use instead. To build them at install, "
            "install torch first, then `pip install --no-build-isolation .` (or `-e .`)",
            file=sys.stderr,
        )
        return [], {}
    recipe = _extension_recipe()
    with_cuda = recipe.want_cuda()
    kind = CUDAExtension if with_cuda else CppExtension
    spec = recipe.build_spec(with_cuda)
    extension = kind(recipe.EXTENSION_NAME, **spec)
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()

setup(
    name="rmda-fused",
    version="0.1.0",
    description="RMDA (Huang & Lee, ICLR 2022) as a fused PyTorch optimizer for structured sparsity",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the Triton kernels (kernels/) and the C++/CUDA sources (csrc/) live at top level and
    # install as rmda_fused.kernels and rmda_fused/csrc (the JIT fallback builds from there)
    packages=find_packages(include=["rmda_fused", "rmda_fused.*"])
    + ["rmda_fused.kernels", "rmda_fused.csrc"],
    package_dir={"rmda_fused.kernels": "kernels", "rmda_fused.csrc": "csrc"},
    package_data={"rmda_fused": ["py.typed"],
                  "rmda_fused.csrc": ["*.cpp", "*.cu", "*.h", "*/*.cpp", "*/*.h", "*/*.cuh", "README.md"]},
    install_requires=["torch>=2.4", "tqdm", "scikit-learn"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "matplotlib", "torchvision", "torch-pruning"],
        # python -m rmda_fused.train on ImageFolder data, its plots, and --export-slim
        "train": ["torchvision", "matplotlib", "torch-pruning"],
        "bench": ["pytest-benchmark", "matplotlib", "torchvision"],
        # tests/recipes: RMDA in Hugging Face's Trainer (optimizer_cls_and_kwargs: 4.47),
        # timm's create_optimizer_v2 (its OptimInfo registry: 1.0.12) and Lightning
        "recipes": ["pytest", "transformers>=4.47", "accelerate>=0.26", "timm>=1.0.12",
                    "lightning>=2.0"],
    },
    entry_points={"console_scripts": ["rmda-train=rmda_fused.train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
