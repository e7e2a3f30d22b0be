"""Compile our Triton kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter checks what the kernels compute; this checks that Triton's compiler accepts them
(types, shapes, constexpr branches) at the tile shapes the launches use, down to PTX. With
``--spills`` it also runs the ptxas that ships with triton and prints registers and spills per
kernel, which is how the tile shapes and warp counts in zoo/kernels/linear_attention.py were chosen.
Kernels: the linear-attention family (every decay mode; Mamba2's SSD runs on it), the gated
delta rule, the grouped GEMM, the long and short convolutions and the selective scan.

    env -u TRITON_INTERPRET .venv/bin/python tests/kernels/sm90_compile.py [--fp32] [--spills]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zoo.kernels import gated_delta as gd
from zoo.kernels import grouped_gemm as gg
from zoo.kernels import linear_attention as la
from zoo.kernels import long_conv as lc
from zoo.kernels import selective_scan as ss
from zoo.kernels.layout import dot_block

TARGET = GPUTarget("cuda", 90, 32)
# Pointers to activations take the input dtype; states, decays and fp32 gradients are fp32.
ACTIVATIONS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dv_ptr", "x_ptr", "y_ptr"}
ACTIVATIONS |= {"u_ptr", "hist_ptr", "weight_ptr", "dy_ptr", "dx_ptr", "dhist_ptr"}
ACTIVATIONS |= {"B_ptr", "C_ptr", "z_ptr", "du_ptr", "dz_ptr"}
GEMM_OPERANDS = {"x_ptr", "w_ptr", "out_ptr", "a_ptr", "b_ptr"}
INDICES = {"cu_ptr", "chunk_offset_ptr", "chunk_start_ptr", "chunk_len_ptr", "offsets_ptr"}
INDICES |= {"tile_ends_ptr"}
# The gated delta rule keeps everything it prepares (W, Ũ, U, T⁻¹) in fp32 and b in fp64.
GATED_DELTA = {
    gd._prepare_kernel, gd._fwd_states_kernel, gd._output_kernel, gd._bwd_states_kernel,
    gd._bwd_grads_kernel, gd._step_kernel,
}  # fmt: skip
GATED_DELTA_OPERANDS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dv_ptr"}


def signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    operands = ACTIVATIONS
    if fn in (gg._grouped_mm_kernel, gg._grouped_wgrad_kernel):
        operands = GEMM_OPERANDS
    elif fn in GATED_DELTA:
        operands = GATED_DELTA_OPERANDS
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif fn in GATED_DELTA and name == "b_ptr":
            sig[name] = "*fp64"
        elif name in operands:
            sig[name] = f"*{dtype}"
        elif name in INDICES:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    return sig


def launches(dtype: str):
    """(kernel, constexprs, warps) for every mode at head dim 128, as `chunk_linear_attention` and
    `linear_attention_step` launch them (None pointers are constexpr, as at a real launch)."""
    prec = "ieee" if dtype == "fp32" else "tf32"
    c, b64, b32 = 64, dot_block(128, 64), dot_block(128, 32)
    for decay in (la.DECAY_NONE, la.DECAY_HEAD, la.DECAY_KEY):
        unused = {}
        if decay != la.DECAY_KEY:
            unused["b_ptr"] = None
        if decay != la.DECAY_HEAD:
            unused["ld_ptr"] = None
        rows = la._row_tile(decay, c)
        bk_out = b32 if decay == la.DECAY_KEY else b64
        mode = dict(DECAY=decay, PREC=prec, **unused)
        for reverse in (False, True):
            states = dict(C=c, BK=b64, BV=b64, REVERSE=reverse, HAS_START=True, STORE_END=True)
            yield la._states_kernel, {**states, **mode}, la._WARPS
        yield la._output_kernel, dict(C=c, R=rows, BK=bk_out, BV=b64, **mode), la._WARPS
        yield la._grads_kernel, dict(C=c, R=rows, BK=b32, BV=b32, **mode), la._WARPS
        step = {"g_ptr": None} if decay != la.DECAY_KEY else {}
        if decay != la.DECAY_HEAD:
            step["ld_ptr"] = None
        yield la._step_kernel, dict(BK=b64, BV=b64, DECAY=decay, HAS_STATE=True, **step), 4
    yield la._chunk_cumsum_kernel, dict(C=c, BK=b64), 4
    # The grouped GEMM's fixed tiles (zoo/kernels/grouped_gemm.py: _mm_triton, _wgrad_triton).
    yield gg._grouped_mm_kernel, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4
    yield gg._grouped_wgrad_kernel, dict(BLOCK_A=64, BLOCK_B=64, BLOCK_M=32), 4
    # The long and short convs at full tiles (zoo/kernels/long_conv.py), history and bias present.
    rows, channels = dict(BT=lc._ROWS, BD=lc._CHANNELS), dict(BT=lc._ROWS, BC=lc._CHANNELS)
    for reverse in (False, True):
        yield lc._long_conv_kernel, dict(**rows, REVERSE=reverse), lc._WARPS
    yield lc._long_conv_taps_grad_kernel, dict(BJ=lc._ROWS, BD=lc._CHANNELS), lc._WARPS
    step = dict(BS=lc._STEP_ROWS, BD=lc._STEP_CHANNELS, HAS_HISTORY=True, HAS_BIAS=True)
    yield lc._long_conv_step_kernel, step, lc._STEP_WARPS
    yield lc._short_conv_kernel, dict(**channels, HAS_HISTORY=True, HAS_BIAS=True), lc._WARPS
    grads = dict(HAS_HISTORY=True, HISTORY_GRAD=True, WEIGHT_GRAD=True)
    yield lc._short_conv_grad_kernel, dict(**channels, **grads), lc._WARPS
    # The selective scan at N = 16, every optional input present (zoo/kernels/selective_scan.py).
    scan = dict(BT=ss._SCAN_BT, BD=ss._SCAN_BD, BN=16, HAS_D=True, HAS_Z=True)
    yield ss._scan_fwd_kernel, dict(**scan, HAS_H0=True, STORE_HT=True), ss._SCAN_WARPS
    yield ss._scan_bwd_kernel, dict(**scan, HAS_DHT=True, STORE_DH0=True), ss._SCAN_WARPS
    step = dict(BD=ss._SCAN_BD, BN=16, HAS_D=True, HAS_STATE=True)
    yield ss._scan_step_kernel, step, 4
    # The gated delta rule at K = V = 128 (zoo/kernels/gated_delta.py), every option on.
    bk = dict(C=c, BK=dot_block(128, 256), PREC=prec)
    yield gd._prepare_kernel, dict(**bk, BV=b64), gd._WARPS
    yield gd._fwd_states_kernel, dict(**bk, BV=b64, HAS_H0=True, STORE_HT=True), gd._WARPS
    yield gd._output_kernel, dict(**bk, BV=b64), gd._WARPS
    yield gd._bwd_states_kernel, dict(**bk, BV=b64, HAS_DHT=True, STORE_DH0=True), gd._WARPS
    yield gd._bwd_grads_kernel, dict(**bk, BV=b32), gd._WARPS
    yield gd._step_kernel, dict(BK=dot_block(128, 256), BV=b64, HAS_STATE=True), 4


def ptxas_report(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(tmp, "k.o")]
        out = subprocess.run(cmd, capture_output=True, text=True).stderr.splitlines()
    return " | ".join(line.split(":", 1)[-1].strip() for line in out if "spill" in line)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp32", action="store_true", help="also fp32 inputs (slower)")
    parser.add_argument("--spills", action="store_true", help="ptxas registers and spills")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels' compiler")
    count = 0
    for dtype in ("bf16", "fp32") if args.fp32 else ("bf16",):
        for fn, constexprs, warps in launches(dtype):
            source = ASTSource(fn, signature(fn, dtype, constexprs), constexprs)
            kernel = triton.compile(source, target=TARGET, options={"num_warps": warps})
            mode = f" DECAY={constexprs['DECAY']}" if "DECAY" in constexprs else ""
            line = f"{dtype}{mode} {fn.__name__} ({warps} warps)"
            if args.spills:
                line += ": " + ptxas_report(kernel.asm["ptx"])
            print(line, flush=True)
            count += 1
    print(f"compiled {count} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
