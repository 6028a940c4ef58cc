"""Shared fixtures: every backend rmda_fused knows, on every device this machine has.

``backend`` is parametrized over every name in :func:`rmda_fused.available_backends` (the
list grows as backends land); a backend that is unavailable here, or that cannot take
tensors on the ``device`` under test, is skipped with its reason.
"""
from __future__ import annotations

import os
import sys

import torch

# Before anything imports triton: without CUDA, a Triton backend can still run on CPU
# tensors in Triton's interpreter (slow; the parametrized suite keeps shapes small).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # float64_reference, helpers
# The repository's kernels/ folder is installed as rmda_fused.kernels. From the repository
# root, which `python -m pytest` puts first on sys.path, it would also be a top-level
# "kernels" and shadow Hugging Face's kernels package, which transformers imports: the root
# goes last instead (benchmarks/ stays importable, no installed package shadows it).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _entry in [p for p in sys.path if os.path.abspath(p or os.curdir) == _ROOT]:
    sys.path.remove(_entry)
sys.path.append(_ROOT)

import pytest  # noqa: E402

import rmda_fused  # noqa: E402
from rmda_fused.functional import resolve_backend  # noqa: E402

BACKENDS = rmda_fused.available_backends()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# the mutation tests run on the fast CPU-side backends only (see test_optimizer.py)
FAST_BACKENDS = [name for name in ("reference", "cpu") if name in BACKENDS]


def usable_backend(name: str, device: str) -> str:
    """``name`` if it can run on ``device`` here, else pytest.skip with the reason."""
    reason = BACKENDS.get(name, f"backend {name!r} is not known to rmda_fused")
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    try:
        resolve_backend(name, torch.device(device))
    except (RuntimeError, ValueError) as exc:
        pytest.skip(f"backend {name!r} cannot run on {device}: {exc}")
    return name


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=list(BACKENDS))
def backend(request, device) -> str:
    return usable_backend(request.param, device)


@pytest.fixture(params=FAST_BACKENDS)
def fast_backend(request) -> str:
    return usable_backend(request.param, "cpu")


def pytest_report_header(config):
    lines = [f"rmda_fused backends: {BACKENDS}", f"devices: {DEVICES}"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("TRITON_INTERPRET=1 (Triton kernels run in the interpreter)")
    return lines
