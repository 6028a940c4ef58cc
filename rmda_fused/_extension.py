"""The C++/CUDA extension ``rmda_fused._C``: its build recipe, and loading it at run time.

One recipe (:func:`build_spec`) serves both ``setup.py`` (ahead-of-time build, what
``pip install`` runs) and the JIT build through ``torch.utils.cpp_extension.load``, so the two
can never differ. At run time :func:`load` imports the compiled ``rmda_fused._C``; if it is
missing it compiles the sources once (a message says so; ninja caches the result under
``TORCH_EXTENSIONS_DIR``). The sources ship inside the package (``rmda_fused/csrc``), so the
fallback works from an installed wheel as well as from a checkout. Build errors are kept
with the compiler's message and reported by the cpp/cuda backends' ``unavailable_reason()``;
nothing falls back silently.

Environment:
- ``RMDA_FUSED_BUILD_CUDA``: ``1`` builds the CUDA kernels even without a GPU (compile-only
  CI; needs CUDA_HOME and a CUDA build of torch), ``0`` never; unset: when CUDA_HOME, a CUDA
  torch and a GPU or ``TORCH_CUDA_ARCH_LIST`` are present.
- ``RMDA_FUSED_CPU_ARCH``: ``generic`` drops the x86-64 AVX2/FMA flags of the CPU kernel.
- ``RMDA_FUSED_NO_JIT=1``: never compile at run time (an unbuilt checkout then reports why).

This module must import without torch (setup.py loads it by path), hence the late imports.
"""
from __future__ import annotations

import os
import platform
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = "csrc"  # relative to the repository root; installed as rmda_fused/csrc
CPU_SOURCES = [f"{CSRC}/bindings.cpp", f"{CSRC}/rmda_cpu.cpp", f"{CSRC}/cpu/work_plan.cpp",
               f"{CSRC}/coupled_cpu.cpp", f"{CSRC}/nonfinite_cpu.cpp",
               f"{CSRC}/step_plan.cpp"]
CUDA_SOURCES = [f"{CSRC}/rmda_cuda.cu", f"{CSRC}/coupled_cuda.cu", f"{CSRC}/nonfinite_cuda.cu"]
EXTENSION_NAME = "rmda_fused._C"
# x86-64 builds assume AVX2+FMA (every x86 server CPU since 2013); load() refuses a CPU
# without them instead of dying on an illegal instruction.
_X86_FLAGS = ["-mavx2", "-mfma", "-mf16c"]


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _cpu_arch_flags() -> list[str]:
    if _is_x86() and os.environ.get("RMDA_FUSED_CPU_ARCH", "") != "generic":
        return list(_X86_FLAGS)
    return []


def want_cuda() -> bool:
    """Whether this build includes the CUDA kernels (see the module docstring)."""
    choice = os.environ.get("RMDA_FUSED_BUILD_CUDA", "")
    if choice == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if choice == "1":
        if CUDA_HOME is None or torch.version.cuda is None:
            raise RuntimeError(
                "RMDA_FUSED_BUILD_CUDA=1 needs a CUDA toolkit (CUDA_HOME) and a CUDA build of "
                f"torch; found CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
            )
        return True
    has_target = torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    return CUDA_HOME is not None and torch.version.cuda is not None and has_target


def _cuda_include_dirs() -> list[str]:
    # The CUDA wheels torch depends on ship headers (cu13/include) that a bare toolkit may
    # lack or have at another version; prefer the ones torch was built against.
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    return [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]


def _openmp_flags() -> list[str]:
    # at::parallel_for is inline: without -fopenmp it silently runs on one thread. The
    # library then links libgomp.so.1, which resolves to the copy torch already loaded.
    import torch

    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def source_root() -> Path:
    """The folder holding ``csrc/``: the package itself once installed, else the checkout."""
    installed = Path(__file__).resolve().parent
    return installed if (installed / CSRC).is_dir() else ROOT


def build_spec(with_cuda: bool) -> dict:
    """Sources (relative to :func:`source_root`), flags and include dirs of the extension."""
    openmp = _openmp_flags()
    cxx = ["-O3", *_cpu_arch_flags(), *openmp]  # torch's cpp_extension picks the C++ standard
    spec = {
        "sources": CPU_SOURCES + (CUDA_SOURCES if with_cuda else []),
        "extra_compile_args": {"cxx": cxx},
        "extra_link_args": openmp,
        "include_dirs": [str(source_root() / CSRC)],
    }
    if with_cuda:
        spec["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        spec["include_dirs"] += _cuda_include_dirs()
    return spec


_lock = threading.Lock()
_state: dict[str, object] = {}


def _jit_build(with_cuda: bool) -> None:
    from torch.utils import cpp_extension

    spec = build_spec(with_cuda)
    what = "C++ and CUDA" if with_cuda else "C++"
    print(
        f"rmda_fused: rmda_fused._C is not built; building the {what} extension with ninja "
        f"(the first time takes {'2-4 min' if with_cuda else '30-60 s'}, later runs reuse the "
        "cache in TORCH_EXTENSIONS_DIR)...",
        file=sys.stderr, flush=True,
    )
    cpp_extension.load(
        name="rmda_fused_C" + ("_cuda" if with_cuda else ""),
        sources=[str(source_root() / s) for s in spec["sources"]],
        extra_cflags=spec["extra_compile_args"]["cxx"],
        extra_cuda_cflags=spec["extra_compile_args"].get("nvcc"),
        extra_ldflags=spec["extra_link_args"],
        extra_include_paths=spec["include_dirs"],
        with_cuda=with_cuda,
        is_python_module=False,  # loads the library so its TORCH_LIBRARY blocks register the ops
        verbose=False,
    )


def _check_cpu() -> str | None:
    import torch

    if _is_x86() and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return ("the C++ kernels were built for AVX2+FMA, which this CPU lacks; rebuild with "
                "RMDA_FUSED_CPU_ARCH=generic")
    return None


def _load() -> None:
    import torch

    reason = _check_cpu()
    if reason:
        raise RuntimeError(reason)
    try:
        import rmda_fused._C  # noqa: F401  (built by setup.py)
    except ModuleNotFoundError:
        if os.environ.get("RMDA_FUSED_NO_JIT") == "1":
            raise RuntimeError(
                "rmda_fused._C is not built and RMDA_FUSED_NO_JIT=1 forbids compiling it now; "
                "build it with `pip install --no-build-isolation .` (or `-e .`)"
            ) from None
        _jit_build(want_cuda())
    except ImportError as exc:
        raise RuntimeError(
            f"rmda_fused._C exists but does not load ({exc}); it was probably built against "
            "another torch: rebuild with `pip install --no-build-isolation .` (or `-e .`)"
        ) from exc
    _register_fake(torch)


def _register_fake(torch) -> None:
    # The op only mutates its inputs, so under FakeTensor / torch.compile tracing it does
    # nothing; this is what lets torch.compile and opcheck see through it.
    @torch.library.register_fake("rmda_fused::rmda_step_")
    def _(params, grads, initials, duals, steps, alphas, zero_masks, views, lr, momentum, lam,
          lr_tensor=None, grad_scale=None, found_inf=None):
        return None

    @torch.library.register_fake("rmda_fused::nonfinite_")
    def _(tensors, found_inf):
        return None


def load() -> None:
    """Make ``torch.ops.rmda_fused`` available; raises RuntimeError with the reason if not."""
    with _lock:
        if "error" not in _state:
            try:
                _load()
                _state["error"] = None
            except Exception as exc:  # kept: the build/import error is the backend's reason
                _state["error"] = f"{type(exc).__name__}: {exc}"
        error = _state["error"]
    if error:
        raise RuntimeError(error)


def load_error() -> str | None:
    """None if the extension is loaded (loading it now if needed), else why not."""
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def has_cuda_kernels() -> bool:
    """Whether the loaded library registered the CUDA kernel of rmda_step_."""
    import torch

    if load_error() is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("rmda_fused::rmda_step_", "CUDA")
