"""`pip wheel` gives a platform wheel holding rmda_fused._C, the kernel sources the JIT
fallback builds from, and py.typed; installed on its own (outside the checkout) it loads _C
without compiling."""
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

root = Path(__file__).resolve().parent.parent
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                    "--no-deps", str(root), "-w", str(tmp / "dist")], check=True,
                   env=dict(os.environ, MAX_JOBS="2"))
    (wheel,) = (tmp / "dist").glob("rmda_fused-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), f"not a platform wheel: {wheel.name}"
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("rmda_fused/_C", "rmda_fused/csrc/bindings.cpp", "rmda_fused/csrc/rmda_cpu.cpp",
                   "rmda_fused/py.typed", "rmda_fused/kernels/__init__.py"):
        assert any(n.startswith(needed) for n in names), f"{wheel.name} lacks {needed}"
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True)
    probe = ("import rmda_fused, rmda_fused._C as c; from rmda_fused import _extension; "
             "assert _extension.load_error() is None, _extension.load_error(); "
             "assert c.__file__.startswith(%r), c.__file__; "
             "assert (_extension.source_root() / 'csrc' / 'bindings.cpp').is_file(); "
             "print(c.__file__)" % str(target))
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, cwd=tmp, env=dict(os.environ, PYTHONPATH=str(target),
                                                       RMDA_FUSED_NO_JIT="1"))
    assert "build" not in out.stderr.lower(), out.stderr
    print(f"check_wheel: {wheel.name} holds _C and csrc/; installed alone it loads "
          f"{out.stdout.strip()}")
