"""The kernels compile for a real GPU target (sm_90), even on a machine without one.

The interpreter runs the kernels as Python, so it cannot catch what only the compiler
rejects (a variable whose type differs between the branches of a runtime ``if``, a global
that is not a constexpr, ...). Here each kernel is compiled ahead of time to a cubin with
triton's bundled ptxas, in a subprocess that imports the kernels without TRITON_INTERPRET,
and, where cuobjdump is bundled, the fp32/bf16 variants are checked not to spill registers
(fp64 ones may: twice the registers per value, and fp64 is not the fast path).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import os, subprocess, tempfile
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from rmda_fused.backends import triton as backend
    from rmda_fused.kernels import rmda_elementwise as E, rmda_grouped as G, rmda_scalars as S
    assert backend.unavailable_reason() is None or "CUDA" in backend.unavailable_reason()
    target = GPUTarget("cuda", 90, 32)
    POINTERS = {"meta": "*i64", "tiles": "*i64", "hyper": "*fp64", "lr_ptr": "*fp32",
                "scale_ptr": "*fp32", "inf_ptr": "*fp32", "n_tensors": "i32"}

    def compile(kernel, fp64, num_warps, **constexprs):
        state = "*fp64" if fp64 else "*fp32"
        signature = {name: "constexpr" if name in constexprs else POINTERS.get(name, state)
                     for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                  options=dict(num_warps=num_warps))
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        if os.path.exists(tool):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                usage = subprocess.run([tool, "--dump-resource-usage", f.name],
                                       capture_output=True, text=True).stdout
            print("USAGE", kernel.__name__, fp64, " ".join(usage.split()[-12:]))
        return compiled

    for fp64, P in ((False, tl.float32), (False, tl.bfloat16), (True, tl.float64)):
        F = tl.float64 if fp64 else tl.float32
        for has_lr_tensor in (False, True):
            compile(S._rmda_scalars_kernel, fp64, 4, F=F, FP64=fp64,
                    HAS_LR_TENSOR=has_lr_tensor, HAS_SCALE=True, HAS_INF=True,
                    BLOCK=S.BLOCK_T)
        for prox in (False, True):
            compile(E._rmda_elementwise_kernel, fp64, 8, P=P, G=P, I=P, F=F, FP64=fp64,
                    PROX=prox, RTNE=False, BLOCK=E.BLOCK)
        for br, bl, bg in G.TILES.values():
            tiles = dict(P=P, I=P, F=F, FP64=fp64, TCOL=G.TCOL, RTNE=False, BLOCK_R=br,
                         BLOCK_L=bl, BLOCK_G=bg)
            compile(G._rmda_grouped_kernel, fp64, 8, G=P, **tiles)
            compile(G._rmda_grouped_apply_kernel, fp64, 8, **tiles)
    print("COMPILED")
''')


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("no ptxas to compile with")
    assert run.returncode == 0 and "COMPILED" in run.stdout, run.stderr[-4000:]
    for line in run.stdout.splitlines():
        if line.startswith("USAGE") and " False " in line:  # fp32 / bf16 state
            stack = re.search(r"STACK:(\d+)", line)
            assert stack and int(stack.group(1)) == 0, f"register spills: {line}"

