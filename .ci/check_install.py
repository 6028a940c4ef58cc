"""The installed package loads rmda_fused._C as built by the install: no compiling, no build
message, and the cpu backend steps with it. Run with RMDA_FUSED_NO_JIT=1 (a JIT build then
fails instead of hiding a missing _C)."""
import contextlib
import io
import os
import sys

import torch

assert os.environ.get("RMDA_FUSED_NO_JIT") == "1", "run with RMDA_FUSED_NO_JIT=1"
err = io.StringIO()
with contextlib.redirect_stderr(err):
    import rmda_fused
    from rmda_fused import _extension

    import rmda_fused._C  # noqa: F401  (ImportError here: the install built no _C)

    assert _extension.load_error() is None, _extension.load_error()
    p = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    opt = rmda_fused.RMDA([p], lr=0.1, lam=1e-3, backend="cpu")
    p.grad = torch.randn_like(p)
    opt.step()
assert "build" not in err.getvalue().lower(), f"a build message was printed:\n{err.getvalue()}"
print(f"check_install: rmda_fused._C loaded from {rmda_fused._C.__file__} without compiling; "
      f"backends {rmda_fused.available_backends()}", file=sys.stderr)
