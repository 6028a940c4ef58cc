"""The kernels compile for a real GPU target (sm_90), even on a machine without one.

The interpreter runs the kernels as Python, so it cannot catch what only the compiler
rejects (a variable whose type differs between the branches of a runtime ``if``, a global
that is not a constexpr, ...). Here each kernel is compiled ahead of time to a cubin with
triton's bundled ptxas, in a subprocess that imports the kernels without TRITON_INTERPRET,
and, where cuobjdump is bundled, the fp32/bf16 variants are checked not to spill registers
(fp64 ones may: twice the registers per value, and fp64 is not the fast path). The PTX is
checked for what the interpreter cannot show: 128-bit loads in the ALIGNED variants, and a
barrier between the loads of t and A and the one-thread arrival at the tensor's counter.
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
    from rmda_fused.kernels import rmda_coupled as C, rmda_elementwise as E, rmda_grouped as G
    from rmda_fused.kernels import rmda_scalars as S
    assert backend.unavailable_reason() is None or "CUDA" in backend.unavailable_reason()
    target = GPUTarget("cuda", 90, 32)
    POINTERS = {"meta": "*i64", "tiles": "*i64", "tasks": "*i64", "counters": "*i32",
                "hyper": "*fp64", "lr_ptr": "*fp32", "scale_ptr": "*fp32", "inf_ptr": "*fp32",
                "n_tensors": "i32", "n_tasks": "i32", "bands": "*i64", "reduces": "*i64",
                "targets": "*i64"}
    AMP = dict(HAS_LR_TENSOR=True, HAS_SCALE=True, HAS_INF=True)

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

    def vector_loads(compiled):  # 128-bit (v4 of 32 bits) and 64-bit global loads
        ptx = compiled.asm["ptx"]
        return ptx.count("ld.global.v4.b32"), ptx.count("ld.global.v2.b32")

    def arrival_after_barrier(compiled):
        """Whether the arrival (one thread's acq_rel atomic) follows a barrier with no global
        load between them: every thread's load of the old t and A precedes the release."""
        lines = compiled.asm["ptx"].splitlines()
        atoms = [i for i, line in enumerate(lines) if "atom.global.gpu.acq_rel.add" in line]
        if len(atoms) != 1:
            return False
        before = lines[:atoms[0]]
        barriers = [i for i, line in enumerate(before) if "bar.sync" in line]
        return bool(barriers) and not any("ld.global" in line
                                          for line in before[barriers[-1]:])

    for fp64, P in ((False, tl.float32), (False, tl.bfloat16), (True, tl.float64)):
        F = tl.float64 if fp64 else tl.float32
        for has_lr_tensor in (False, True):
            compile(S._rmda_scalars_kernel, fp64, 4, F=F, FP64=fp64,
                    HAS_LR_TENSOR=has_lr_tensor, HAS_SCALE=True, HAS_INF=True,
                    BLOCK=S.BLOCK_T)
        for prox in (False, True):
            for aligned in (False, True):
                k = compile(E._rmda_elementwise_kernel, fp64, 8, P=P, G=P, I=P, F=F,
                            FP64=fp64, **AMP, PROX=prox, RTNE=False, ALIGNED=aligned,
                            BLOCK=E.BLOCK)
                print("VECTOR elementwise", P, prox, aligned, *vector_loads(k))
                assert arrival_after_barrier(k), "elementwise: a load may follow the arrival"
        for grouping, (br, bl, bg) in G.TILES.items():
            for aligned in (False, True):
                k = compile(G._rmda_grouped_kernel, fp64, 8, P=P, G=P, I=P, F=F, FP64=fp64,
                            **AMP, RTNE=False, ALIGNED=aligned, BLOCK_R=br, BLOCK_L=bl,
                            BLOCK_G=bg)
                print("VECTOR", grouping, P, False, aligned, *vector_loads(k))
                assert arrival_after_barrier(k), "grouped: a load may follow the arrival"
        br, bl, bg = C.TILE  # the coupled-group step's two phases
        compile(C._rmda_partials_kernel, fp64, 8, G=P, I=P, F=F, FP64=fp64, BLOCK_R=br,
                BLOCK_L=bl, BLOCK_G=bg)
        compile(C._rmda_partials_reduce_kernel, fp64, 8, F=F, BLOCK_G=bg)
        for has_inf in (False, True):
            compile(C._rmda_apply_kernel, fp64, 8, P=P, I=P, F=F, FP64=fp64, HAS_INF=has_inf,
                    RTNE=False, BLOCK_R=br, BLOCK_L=bl)
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
    # ALIGNED kernels load 128 bits at a time where the dtype allows it (fp32 arrays: v4 of
    # 32 bits; bf16 W, g, W0: 64 bits, beside fp32 V's 128), the others 32 bits at most
    vectors = {tuple(line.split()[1:5]): tuple(map(int, line.split()[5:]))
               for line in run.stdout.splitlines() if line.startswith("VECTOR")}
    assert len(vectors) == 3 * 2 * 4, sorted(vectors)
    for (kernel, dtype, _, aligned), (v4, v2) in vectors.items():
        if aligned == "False":
            assert v4 == v2 == 0, f"{kernel} {dtype}: vector loads without ALIGNED"
        elif dtype in ("fp32", "bf16"):
            assert v4 > 0, f"{kernel} {dtype}: no 128-bit load with ALIGNED"

