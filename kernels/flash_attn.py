"""Flash attention in Triton: forward and backward, causal or not, grouped-query heads, packed documents.

Follows FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691) and the structure of Triton's fused-attention
tutorial (``python/tutorials/06-fused-attention.py``): the forward streams key/value blocks past a block of queries
with an online softmax and saves the log-sum-exp per query row; the backward recomputes the probabilities from it,
with one kernel producing dK and dV per key block and query head and one producing dQ per query block. With
grouped-query attention, dK and dV come out per query head (fp32) and torch sums each group, as flash-attn does: no
atomics, and no loop over a group's heads inside the kernel, which kept K, V and both fp32 accumulators live across
three pipelined loops and made the kernel spill.

Launch configurations are tables per GPU family and head dim (``_FWD_SHAPES``, ...), each entry compiled ahead of time
for sm_80 and sm_90 by ``kernels/aot.py`` (tests/test_kernels_aot.py): none spills at head dims up to 128.

Public API (same call forms as the ``flash_attn`` package, so backends swap freely):

- ``flash_attn_func(q, k, v, causal=False, softmax_scale=None)``: q ``(B, Sq, Hq, D)``, k and v ``(B, Sk, Hkv, D)``.
- ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
  softmax_scale=None)``: q ``(total_q, Hq, D)``, k and v ``(total_k, Hkv, D)``, ``cu_seqlens`` int32 ``(n + 1,)``;
  document i is rows ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only to itself.

When ``Sq != Sk`` the causal mask is aligned to the bottom-right corner, as in flash-attn >= 2.1: query row i sees key
j iff ``j <= i + Sk - Sq``; a query row that sees no key returns zeros (and gets zero gradients).

Precision: scores, softmax statistics and accumulators are fp32; the probabilities are rounded to the input dtype
before the P @ V and dS @ K products, as in FlashAttention. fp32 inputs use 3xTF32 products on CUDA
(``input_precision="tf32x3"``: tensor cores with about fp32 accuracy), not plain TF32.

CPU interpreter (``TRITON_INTERPRET=1``): its ``tl.dot`` is wrong on bf16 tiles and its fp32 -> bf16 casts truncate,
so for bf16 inputs the kernels upcast tiles to fp32 before every product (``IS_DOT_FP32``) and write outputs into
fp32 buffers that torch then rounds to bf16. The compiled CUDA path is unaffected by these switches.

Memory: O(B * S * H) for the saved log-sum-exp besides inputs and outputs, plus (grouped-query backward only) fp32 dK
and dV per query head; nothing of size S^2 is ever stored.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .runtime import (
    check_device,
    interpret_requested,
    is_interpreted,
    next_power_of_2,
    pick_configs,
    register_kernel,
    use_autotune,
)

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]

LOG2E = 1.4426950408889634  # scores are kept in base 2 so the kernels can use exp2


# ----------------------------------------------------------------------------------------------------------------------
# Launch configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, GPU family (80: sm_8x, A100; 90: sm_90
# and newer, H100/H200) and head-dim class (the padded head dim, counted in 16-bit elements: 64, 128, 256). Every
# entry of the 64 and 128 classes compiles without a register spill for its family, in bf16 and fp16, for causal,
# non-causal and packed attention: tests/test_kernels_aot.py compiles them all for sm_80 and sm_90 ahead of time, and
# docs/kernels.md has the registers of each. The first entry that fits the device's shared memory is the one used
# when autotuning is off. The 256 class holds the small tiles that fit; some of them spill (reported, not failed).
# ----------------------------------------------------------------------------------------------------------------------
_FWD_SHAPES = {
    80: {64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3)],
         128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 8, 3)],
         256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
    90: {64: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3)],
         128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 32, 8, 3)],
         256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
}  # fmt: skip
_DKDV_SHAPES = {
    80: {64: [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3), (16, 64, 8, 2)],
         128: [(64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3), (32, 64, 8, 2)],
         256: [(32, 32, 8, 2), (16, 32, 4, 2)]},
    90: {64: [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3), (16, 64, 8, 2)],
         128: [(32, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 2), (16, 64, 8, 2)],
         256: [(32, 32, 8, 2), (16, 32, 4, 2)]},
}  # fmt: skip
_DQ_SHAPES = {
    80: {64: [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2)],
         128: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3), (64, 32, 8, 2)],
         256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
    90: {64: [(128, 64, 8, 3), (128, 32, 4, 3), (128, 32, 8, 2), (64, 64, 4, 3)],
         128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)],
         256: [(64, 32, 8, 2), (32, 32, 4, 2)]},
}  # fmt: skip
SHAPES = {"fwd": _FWD_SHAPES, "dkdv": _DKDV_SHAPES, "dq": _DQ_SHAPES}
# Under the interpreter: small tiles so the tests' odd lengths cross several blocks, large enough to stay quick.
_FWD_INTERP = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)
_DKDV_INTERP = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)
_DQ_INTERP = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)


def _configs(kind: str) -> list[triton.Config]:
    """Every shape of ``kind`` for any family and head dim, once: the autotuner's candidates (pruned per launch)."""
    shapes = dict.fromkeys(s for by_dim in SHAPES[kind].values() for dim in by_dim.values() for s in dim)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in shapes]


def family(capability: int) -> int:
    """The configuration family of a compute capability (major * 10 + minor): 80 for sm_8x, 90 for sm_90 and up."""
    return 80 if capability < 90 else 90


def dim_class(block_d: int, esize: int) -> int:
    """The head-dim class of a launch: the padded head dim in 16-bit elements (fp32 rows weigh twice), 64/128/256."""
    width = block_d * esize // 2
    return 64 if width <= 64 else (128 if width <= 128 else 256)


def shapes_for(kind: str, capability: int, block_d: int, esize: int) -> list[tuple[int, int, int, int]]:
    """The launch configurations of ``kind`` (fwd | dkdv | dq) for one device and head dim, best guess first."""
    return SHAPES[kind][family(capability)][dim_class(block_d, esize)]


def _device() -> tuple[int, int]:
    """(compute capability as major * 10 + minor, opt-in shared memory per block) of the current CUDA device."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.major * 10 + props.minor, int(getattr(props, "shared_memory_per_block_optin", 0) or 232448)
    return 90, 232448


def smem_estimate(kind: str, bm: int, bn: int, stages: int, bd: int, esize: int) -> int:
    """Shared memory a configuration needs, estimated from its pipelined tiles (K/V for fwd and dq, Q/dO for dkdv);
    above the compiled figure for 16-bit inputs, ~1.4x below it for fp32 (3xTF32 splits), hence the 1.5 factor."""
    if kind == "fwd":
        smem = (bm * bd + stages * 2 * bn * bd) * esize
    elif kind == "dkdv":
        smem = (2 * bn * bd + stages * 2 * bm * bd) * esize
    else:
        smem = (2 * bm * bd + stages * 2 * bn * bd) * esize
    return int(smem * 1.5) if esize == 4 else smem


def _make_prune(kind: str):
    """An ``early_config_prune`` keeping this device's configurations for the launch's head dim (:func:`shapes_for`)
    that fit its shared memory; the first one alone when autotuning is off."""

    def prune(configs: list[triton.Config], nargs: dict, **kwargs: object) -> list[triton.Config]:
        if interpret_requested():  # the interpreter's single config (pick_configs)
            return configs
        args = {**nargs, **kwargs}
        bd = int(args["BLOCK_D"])
        esize = args["Q"].element_size()
        capability, limit = _device()
        wanted = shapes_for(kind, capability, bd, esize)
        by_shape = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in configs}
        kept = [by_shape[s] for s in wanted if smem_estimate(kind, s[0], s[1], s[3], bd, esize) <= limit]
        if not kept:  # nothing fits (a small-smem device at a large head dim): the smallest tiles, let it spill
            kept = [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]
        return kept if use_autotune() else kept[:1]

    return prune


_KEY = ["HEAD_DIM", "IS_CAUSAL", "IS_VARLEN", "seqlen_bucket"]
# Lengths vary per call: never let Triton specialise them (e.g. to a constexpr 1) and recompile.
_NO_SPECIALIZE = ["seqlen_q_fixed", "seqlen_k_fixed", "seqlen_bucket"]


# ----------------------------------------------------------------------------------------------------------------------
# Prologue shared by the forward and backward kernels
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _program_ids(REVERSED: tl.constexpr):
    """(block index along grid axis 0, batch row or document, head). REVERSED (causal query-block grids) launches the
    heaviest blocks first, so the tail of the launch is short."""
    if REVERSED:
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid = tl.program_id(0)
    return pid, tl.program_id(1), tl.program_id(2)


@triton.jit
def _doc_bounds(CU_Q, CU_K, b, seqlen_q_fixed, seqlen_k_fixed, IS_VARLEN: tl.constexpr):
    """(q_start, k_start, seqlen_q, seqlen_k, diag) of batch row / document b: the first row of its queries and keys
    (int64 when packed, constexpr 0 otherwise), their counts, and the bottom-right causal offset ``diag``: key j is
    visible to query row i iff j <= i + diag."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        seqlen_k = (tl.load(CU_K + b + 1) - k_start).to(tl.int32)
    else:
        q_start = 0
        k_start = 0
        seqlen_q = seqlen_q_fixed
        seqlen_k = seqlen_k_fixed
    return q_start, k_start, seqlen_q, seqlen_k, seqlen_k - seqlen_q


@triton.jit
def _head_base(PTR, b64, start, h64, stride_b, stride_s, stride_h):
    """PTR advanced to row ``start`` of batch row ``b64`` and head ``h64``; offsets in int64."""
    return PTR + b64 * stride_b + start * stride_s + h64 * stride_h


@triton.jit
def _key_range(start_m, seqlen_k, diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(n_full, n_end) for the query block at start_m: key blocks [0, n_full) need no mask; [n_full, n_end) need the
    key-bound and/or causal mask."""
    if IS_CAUSAL:
        n_end = tl.minimum(seqlen_k, start_m + BLOCK_M + diag)
        n_full = tl.minimum(tl.maximum(start_m + diag + 1, 0) // BLOCK_N, seqlen_k // BLOCK_N) * BLOCK_N
    else:
        n_end = seqlen_k
        n_full = (seqlen_k // BLOCK_N) * BLOCK_N
    return tl.maximum(tl.minimum(n_full, n_end), 0), n_end


@triton.jit
def _load_kv(K, V, cols, offs_d, stride_k, stride_v, seqlen_k, HEAD_DIM: tl.constexpr, IS_MASKED: tl.constexpr,
             HAS_D_PAD: tl.constexpr, IS_DOT_FP32: tl.constexpr):  # fmt: skip
    """(BLOCK_N, BLOCK_D) key and value tiles at rows ``cols``; masked on key bounds only when IS_MASKED."""
    k_ptrs = K + cols[:, None] * stride_k + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    v_ptrs = V + cols[:, None] * stride_v + offs_d[None, :]
    d_ok = offs_d[None, :] < HEAD_DIM
    if IS_MASKED:
        kv_ok = cols[:, None] < seqlen_k
        if HAS_D_PAD:
            kv_ok = kv_ok & d_ok
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    elif HAS_D_PAD:
        k = tl.load(k_ptrs, mask=d_ok, other=0.0)
        v = tl.load(v_ptrs, mask=d_ok, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if IS_DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


# ----------------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_n, offs_d, n_lo, n_hi, seqlen_k, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IS_MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_D_PAD: tl.constexpr, IS_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks [n_lo, n_hi); masks (key bounds, causal) only when IS_MASKED."""
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,) key positions inside the document
        k, v = _load_kv(K, V, cols, offs_d, stride_kn, stride_vn, seqlen_k, HEAD_DIM, IS_MASKED, HAS_D_PAD, IS_DOT_FP32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if IS_MASKED:
            ok = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet: avoid inf - inf
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IS_DOT_FP32:
            acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=pick_configs(_configs("fwd"), _FWD_INTERP), key=_KEY,
                 prune_configs_by={"early_config_prune": _make_prune("fwd")})  # fmt: skip
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd(
    Q, K, V, OUT, LSE, CU_Q, CU_K, qk_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q_fixed, seqlen_k_fixed, group, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_D_PAD: tl.constexpr, IS_DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, b, h = _program_ids(IS_CAUSAL)
    q_start, k_start, seqlen_q, seqlen_k, diag = _doc_bounds(CU_Q, CU_K, b, seqlen_q_fixed, seqlen_k_fixed, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group).to(tl.int64)
    Qb = _head_base(Q, b64, q_start, h64, stride_qb, stride_qs, stride_qh)
    Kb = _head_base(K, b64, k_start, hk64, stride_kb, stride_ks, stride_kh)
    Vb = _head_base(V, b64, k_start, hk64, stride_vb, stride_vs, stride_vh)
    Ob = _head_base(OUT, b64, q_start, h64, stride_ob, stride_os, stride_oh)
    LSEb = _head_base(LSE, b64, q_start, h64, stride_lb, 1, stride_lh)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_m[:, None] < seqlen_q
    if HAS_D_PAD:
        q_ok = q_ok & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Qb + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    if IS_DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full, n_end = _key_range(start_m, seqlen_k, diag, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, Kb, Vb, stride_ks, stride_vs, offs_m, offs_n, offs_d, 0, n_full, seqlen_k, diag, qk_scale,
        HEAD_DIM, BLOCK_N, False, IS_CAUSAL, HAS_D_PAD, IS_DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, Kb, Vb, stride_ks, stride_vs, offs_m, offs_n, offs_d, n_full, n_end, seqlen_k, diag,
        qk_scale, HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_D_PAD, IS_DOT_FP32, DOT_PRECISION,
    )  # fmt: skip

    empty = l_i == 0.0  # rows that see no key (causal with Sq > Sk): output 0, lse +inf so backward gives p = 0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(Ob + offs_m[:, None] * stride_os + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=q_ok)
    tl.store(LSEb + offs_m, lse, mask=offs_m < seqlen_q)


register_kernel(_attn_fwd)


# ----------------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(
    OUT, DO, DELTA, CU_Q, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh, stride_lb, stride_lh,
    seqlen_q_fixed, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d O[i, d] * dO[i, d] (fp32), stored in the log-sum-exp layout."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        seqlen_q = (tl.load(CU_Q + b + 1) - q_start).to(tl.int32)
    else:
        q_start = 0
        seqlen_q = seqlen_q_fixed
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    o = tl.load(OUT + b64 * stride_ob + h64 * stride_oh + (q_start + offs_m[:, None]) * stride_os + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(DO + b64 * stride_db + h64 * stride_dh + (q_start + offs_m[:, None]) * stride_ds + offs_d[None, :],
                 mask=ok, other=0.0).to(tl.float32)  # fmt: skip
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_qs, stride_dos, offs_n, offs_d, m_lo, m_hi, seqlen_q, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, IS_MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_D_PAD: tl.constexpr, IS_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block over query blocks [m_lo, m_hi) of one query head."""
    d_ok = offs_d[None, :] < HEAD_DIM
    for start_m in range(m_lo, m_hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions inside the document
        q_ptrs = Qb + rows[:, None] * stride_qs + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
        do_ptrs = DOb + rows[:, None] * stride_dos + offs_d[None, :]
        if IS_MASKED:
            r_ok = rows < seqlen_q
            qd_ok = r_ok[:, None]
            if HAS_D_PAD:
                qd_ok = qd_ok & d_ok
            q = tl.load(q_ptrs, mask=qd_ok, other=0.0)
            do = tl.load(do_ptrs, mask=qd_ok, other=0.0)
            lse = tl.load(LSEb + rows, mask=r_ok, other=float("inf"))
            delta = tl.load(DELTAb + rows, mask=r_ok, other=0.0)
        else:
            if HAS_D_PAD:
                q = tl.load(q_ptrs, mask=d_ok, other=0.0)
                do = tl.load(do_ptrs, mask=d_ok, other=0.0)
            else:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            lse = tl.load(LSEb + rows)
            delta = tl.load(DELTAb + rows)
        if IS_DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        pT = tl.math.exp2(qkT - lse[None, :])
        if IS_MASKED:
            ok = rows[None, :] < seqlen_q
            if IS_CAUSAL:
                ok = ok & (offs_n[:, None] <= rows[None, :] + diag)
            pT = tl.where(ok, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        if IS_DOT_FP32:
            dv = tl.dot(pT, do, dv, input_precision=DOT_PRECISION)
            dk = tl.dot(dsT, q, dk, input_precision=DOT_PRECISION)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=pick_configs(_configs("dkdv"), _DKDV_INTERP), key=_KEY,
                 prune_configs_by={"early_config_prune": _make_prune("dkdv")})  # fmt: skip
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, seqlen_q_fixed, seqlen_k_fixed, group, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_D_PAD: tl.constexpr, IS_DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n, b, h = _program_ids(False)  # grid axis 2 runs over query heads
    q_start, k_start, seqlen_q, seqlen_k, diag = _doc_bounds(CU_Q, CU_K, b, seqlen_q_fixed, seqlen_k_fixed, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = offs_n[:, None] < seqlen_k
    if HAS_D_PAD:
        kv_ok = kv_ok & (offs_d[None, :] < HEAD_DIM)
    Kb = _head_base(K, b64, k_start, hk64, stride_kb, stride_ks, stride_kh)
    Vb = _head_base(V, b64, k_start, hk64, stride_vb, stride_vs, stride_vh)
    k = tl.load(Kb + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(Vb + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_ok, other=0.0)
    if IS_DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks (aligned to BLOCK_M) that see this key block: [b_lo, nb). Those in [b_full_lo, b_full_hi) need
    # no mask (every row in bounds and, if causal, past the diagonal for every key of the block).
    nb = tl.cdiv(seqlen_q, BLOCK_M)
    b_full_hi = seqlen_q // BLOCK_M
    if IS_CAUSAL:
        b_lo = tl.maximum(start_n - diag, 0) // BLOCK_M
        b_full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M)
    else:
        b_lo = 0
        b_full_lo = 0
    head_end = tl.minimum(b_full_lo, nb)
    tail_lo = tl.maximum(tl.maximum(b_full_hi, b_full_lo), b_lo)
    Qb = _head_base(Q, b64, q_start, h64, stride_qb, stride_qs, stride_qh)
    DOb = _head_base(DO, b64, q_start, h64, stride_dob, stride_dos, stride_doh)
    LSEb = _head_base(LSE, b64, q_start, h64, stride_lb, 1, stride_lh)
    DELTAb = _head_base(DELTA, b64, q_start, h64, stride_lb, 1, stride_lh)
    dk, dv = _dkdv_inner(
        dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_qs, stride_dos, offs_n, offs_d, b_lo * BLOCK_M,
        head_end * BLOCK_M, seqlen_q, diag, qk_scale,
        HEAD_DIM, BLOCK_M, True, IS_CAUSAL, HAS_D_PAD, IS_DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    dk, dv = _dkdv_inner(
        dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_qs, stride_dos, offs_n, offs_d, b_full_lo * BLOCK_M,
        b_full_hi * BLOCK_M, seqlen_q, diag, qk_scale,
        HEAD_DIM, BLOCK_M, False, IS_CAUSAL, HAS_D_PAD, IS_DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    dk, dv = _dkdv_inner(
        dk, dv, k, v, Qb, DOb, LSEb, DELTAb, stride_qs, stride_dos, offs_n, offs_d, tail_lo * BLOCK_M,
        nb * BLOCK_M, seqlen_q, diag, qk_scale,
        HEAD_DIM, BLOCK_M, True, IS_CAUSAL, HAS_D_PAD, IS_DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    dk = dk * sm_scale
    # (.., H, D) outputs: the key/value heads' gradients when group == 1, else one partial per query head
    DKb = _head_base(DK, b64, k_start, h64, stride_dkb, stride_dks, stride_dkh)
    DVb = _head_base(DV, b64, k_start, h64, stride_dvb, stride_dvs, stride_dvh)
    tl.store(DKb + offs_n[:, None] * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DVb + offs_n[:, None] * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, Kb, Vb, stride_ks, stride_vs, offs_m, offs_d, n_lo, n_hi, seqlen_k, diag, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IS_MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_D_PAD: tl.constexpr, IS_DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over key blocks [n_lo, n_hi)."""
    for start_n in range(n_lo, n_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(Kb, Vb, cols, offs_d, stride_ks, stride_vs, seqlen_k, HEAD_DIM, IS_MASKED, HAS_D_PAD,
                        IS_DOT_FP32)  # fmt: skip
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])
        if IS_MASKED:
            ok = cols[None, :] < seqlen_k
            if IS_CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        if IS_DOT_FP32:
            dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION)
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=pick_configs(_configs("dq"), _DQ_INTERP), key=_KEY,
                 prune_configs_by={"early_config_prune": _make_prune("dq")})  # fmt: skip
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh, seqlen_q_fixed, seqlen_k_fixed, group, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_D_PAD: tl.constexpr, IS_DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, b, h = _program_ids(IS_CAUSAL)
    q_start, k_start, seqlen_q, seqlen_k, diag = _doc_bounds(CU_Q, CU_K, b, seqlen_q_fixed, seqlen_k_fixed, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_m < seqlen_q
    q_ok = r_ok[:, None]
    if HAS_D_PAD:
        q_ok = q_ok & (offs_d[None, :] < HEAD_DIM)
    Qb = _head_base(Q, b64, q_start, h64, stride_qb, stride_qs, stride_qh)
    DOb = _head_base(DO, b64, q_start, h64, stride_dob, stride_dos, stride_doh)
    q = tl.load(Qb + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DOb + offs_m[:, None] * stride_dos + offs_d[None, :], mask=q_ok, other=0.0)
    if IS_DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(_head_base(LSE, b64, q_start, h64, stride_lb, 1, stride_lh) + offs_m, mask=r_ok, other=float("inf"))
    delta = tl.load(_head_base(DELTA, b64, q_start, h64, stride_lb, 1, stride_lh) + offs_m, mask=r_ok, other=0.0)
    Kb = _head_base(K, b64, k_start, hk64, stride_kb, stride_ks, stride_kh)
    Vb = _head_base(V, b64, k_start, hk64, stride_vb, stride_vs, stride_vh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full, n_end = _key_range(start_m, seqlen_k, diag, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _dq_inner(
        dq, q, do, lse, delta, Kb, Vb, stride_ks, stride_vs, offs_m, offs_d, 0, n_full, seqlen_k, diag, qk_scale,
        HEAD_DIM, BLOCK_N, False, IS_CAUSAL, HAS_D_PAD, IS_DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse, delta, Kb, Vb, stride_ks, stride_vs, offs_m, offs_d, n_full, n_end, seqlen_k, diag, qk_scale,
        HEAD_DIM, BLOCK_N, True, IS_CAUSAL, HAS_D_PAD, IS_DOT_FP32, DOT_PRECISION,
    )  # fmt: skip
    dq = dq * sm_scale
    DQb = _head_base(DQ, b64, q_start, h64, stride_dqb, stride_dqs, stride_dqh)
    tl.store(DQb + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_ok)


# ----------------------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _seqlen_bucket(n: int) -> int:
    """Coarse sequence-length class for the autotune key (<= 1k, <= 4k, longer), so packed batches with varying
    lengths do not retune on every step."""
    return 0 if n <= 1024 else (1 if n <= 4096 else 2)


def _interp_bf16(t: torch.Tensor) -> bool:
    return t.dtype == torch.bfloat16 and is_interpreted(_attn_fwd)


def _buffer_dtype(dtype: torch.dtype, interp_bf16: bool) -> torch.dtype:
    # The interpreter truncates fp32 -> bf16; write fp32 and let torch round.
    return torch.float32 if interp_bf16 else dtype


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: 3xTF32 on CUDA (tensor cores, ~fp32 accuracy; exact "ieee" FMA products take minutes to compile
    and run far slower); the interpreter computes in fp32 anyway. 16-bit inputs ignore the setting."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if is_interpreted(_attn_fwd) else "tf32x3"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_qkv(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, layout: str) -> None:
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"igpt.kernels.{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"igpt.kernels.{name}: {label} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"igpt.kernels.{name}: {label} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"igpt.kernels.{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"igpt.kernels.{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"igpt.kernels.{name}: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")  # fmt: skip
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"igpt.kernels.{name}: q and k must share the head dim, got {d} and {k.shape[-1]}")
    if not 16 <= d <= 256:
        raise ValueError(f"igpt.kernels.{name}: head dim must be in 16..256, got {d}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"igpt.kernels.{name}: the number of query heads ({hq}) must be a multiple of the number of "
                         f"key/value heads ({hkv})")  # fmt: skip


class _FlashAttn(torch.autograd.Function):
    """Shared autograd function for the batched (``cu_q is None``) and packed-document layouts."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, sm_scale):  # noqa: ANN001, ANN205
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        varlen = cu_q is not None
        interp_bf16 = _interp_bf16(q)
        d = q.shape[-1]
        bd = max(16, next_power_of_2(d))
        if varlen:
            # (total, H, D) viewed as one "batch" row per document; the kernel offsets by cu_seqlens.
            n_batch, (total_q, hq, _), hkv = cu_q.numel() - 1, q.shape, k.shape[1]
            qs, ks, vs = (0, *q.stride()[:2]), (0, *k.stride()[:2]), (0, *v.stride()[:2])
            o = torch.empty(q.shape, dtype=_buffer_dtype(q.dtype, interp_bf16), device=q.device)  # (total, Hq, D)
            os_ = (0, *o.stride()[:2])
            lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device)  # (Hq, total_q), log2 units
            ls = (0, lse.stride(0))
            sq_fixed, sk_fixed = 0, 0
        else:
            n_batch, sq, hq, _ = q.shape
            sk, hkv = k.shape[1], k.shape[2]
            max_q, max_k = sq, sk
            qs, ks, vs = q.stride()[:3], k.stride()[:3], v.stride()[:3]
            o = torch.empty(q.shape, dtype=_buffer_dtype(q.dtype, interp_bf16), device=q.device)  # (B, Sq, Hq, D)
            os_ = o.stride()[:3]
            lse = torch.empty((n_batch, hq, sq), dtype=torch.float32, device=q.device)  # (B, Hq, Sq), log2 units
            ls = lse.stride()[:2]
            sq_fixed, sk_fixed = sq, sk
        group = hq // hkv
        dummy = cu_q if varlen else lse  # never read when IS_VARLEN is False
        if max_q > 0 and n_batch > 0:
            grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_batch, hq)  # noqa: E731
            _attn_fwd[grid](
                q, k, v, o, lse, dummy, cu_k if varlen else dummy, sm_scale * LOG2E,
                *qs, *ks, *vs, *os_, *ls, sq_fixed, sk_fixed, group, _seqlen_bucket(max_q),
                HEAD_DIM=d, BLOCK_D=bd, IS_CAUSAL=causal, IS_VARLEN=varlen, HAS_D_PAD=bd != d,
                IS_DOT_FP32=interp_bf16, DOT_PRECISION=_dot_precision(q.dtype),
            )  # fmt: skip
        elif o.numel():
            o.zero_()
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.meta = (varlen, max_q, max_k, causal, sm_scale, interp_bf16)
        return o.to(q.dtype) if interp_bf16 else o

    @staticmethod
    def backward(ctx, do):  # noqa: ANN001, ANN205
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        varlen, max_q, max_k, causal, sm_scale, interp_bf16 = ctx.meta
        do = _last_dim_contiguous(do)
        d = q.shape[-1]
        bd = max(16, next_power_of_2(d))
        buf = _buffer_dtype(q.dtype, interp_bf16)
        dq = torch.empty(q.shape, dtype=buf, device=q.device)
        delta = torch.empty_like(lse)
        if varlen:
            n_batch, hq, hkv = cu_q.numel() - 1, q.shape[1], k.shape[1]

            def strides3(t: torch.Tensor) -> tuple[int, int, int]:
                return (0, *t.stride()[:2])

            ls = (0, lse.stride(0))
            sq_fixed, sk_fixed = 0, 0
        else:
            n_batch, _, hq, _ = q.shape
            hkv = k.shape[2]

            def strides3(t: torch.Tensor) -> tuple[int, int, int]:
                return t.stride()[:3]

            ls = lse.stride()[:2]
            sq_fixed, sk_fixed = max_q, max_k
        group = hq // hkv
        # dK, dV per query head: the gradients themselves when group == 1; with grouped-query heads, fp32 partials
        # (.., Hq, D) that are summed over each group below (deterministic, no atomics, no loop over heads in the
        # kernel keeping k, v and both accumulators live across it)
        dk_heads, dv_heads = (
            torch.empty((*k.shape[:-2], hq, d), dtype=buf if group == 1 else torch.float32, device=q.device)
            for _ in range(2)
        )  # fmt: skip
        dummy = cu_q if varlen else lse
        common = dict(HEAD_DIM=d, BLOCK_D=bd, IS_CAUSAL=causal, IS_VARLEN=varlen, HAS_D_PAD=bd != d,
                      IS_DOT_FP32=interp_bf16, DOT_PRECISION=_dot_precision(q.dtype))  # fmt: skip
        if n_batch == 0 or max_q == 0 or max_k == 0:  # nothing attends: every gradient is zero
            return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                    None, None, None, None, None, None)  # fmt: skip
        pre_m = 64
        _bwd_preprocess[(triton.cdiv(max_q, pre_m), n_batch, hq)](
            o, do, delta, dummy, *strides3(o), *strides3(do), *ls, sq_fixed,
            HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=pre_m, IS_VARLEN=varlen,
        )  # fmt: skip
        bucket = _seqlen_bucket(max(max_q, max_k))
        cu_k_arg = cu_k if varlen else dummy
        grid_kv = lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), n_batch, hq)  # noqa: E731
        _attn_bwd_dkdv[grid_kv](
            q, k, v, do, dk_heads, dv_heads, lse, delta, dummy, cu_k_arg, sm_scale * LOG2E, sm_scale,
            *strides3(q), *strides3(k), *strides3(v), *strides3(do), *strides3(dk_heads), *strides3(dv_heads), *ls,
            sq_fixed, sk_fixed, group, bucket, **common,
        )  # fmt: skip
        if group == 1:
            dk, dv = dk_heads, dv_heads
        else:  # query head h belongs to key/value head h // group: (.., Hkv, group, D) summed over the group
            dk, dv = (t.view(*k.shape[:-2], hkv, group, d).sum(-2).to(buf) for t in (dk_heads, dv_heads))
        grid_q = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_batch, hq)  # noqa: E731
        _attn_bwd_dq[grid_q](
            q, k, v, do, dq, lse, delta, dummy, cu_k_arg, sm_scale * LOG2E, sm_scale,
            *strides3(q), *strides3(k), *strides3(v), *strides3(do), *strides3(dq), *ls,
            sq_fixed, sk_fixed, group, bucket, **common,
        )  # fmt: skip
        if interp_bf16:
            dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def _scale(softmax_scale: float | None, d: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"igpt.kernels: softmax_scale must be a finite number, got {softmax_scale}")
    return scale


def flash_attn_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, softmax_scale: float | None = None
) -> torch.Tensor:
    """Scaled dot-product attention softmax(q k^T * scale) v over ``(B, S, H, D)`` tensors.

    Args:
        q: ``(B, Sq, Hq, D)`` queries; fp16, bf16 or fp32; D in 16..256 (any value; powers of two are fastest).
        k: ``(B, Sk, Hkv, D)`` keys, same dtype and device; ``Hq % Hkv == 0`` (grouped-query attention).
        v: ``(B, Sk, Hkv, D)`` values.
        causal: mask future keys (bottom-right aligned when ``Sq != Sk``).
        softmax_scale: score scale; default ``1 / sqrt(D)``.

    Returns:
        ``(B, Sq, Hq, D)`` in the input dtype. Differentiable in q, k and v.
    """
    _check_qkv("flash_attn_func", q, k, v, 4, "(batch, seqlen, heads, head_dim)")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"igpt.kernels.flash_attn_func: q and k must share the batch size, got {q.shape[0]} and "
                         f"{k.shape[0]}")  # fmt: skip
    check_device("flash_attn_func", _attn_fwd, q, k, v)
    return _FlashAttn.apply(q, k, v, None, None, 0, 0, bool(causal), _scale(softmax_scale, q.shape[-1]))


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention over documents packed along the token axis; no token attends outside its document.

    Args:
        q: ``(total_q, Hq, D)``; k, v: ``(total_k, Hkv, D)``; same dtypes and head-dim rules as :func:`flash_attn_func`.
        cu_seqlens_q, cu_seqlens_k: int32 ``(n_docs + 1,)`` cumulative lengths starting at 0 (document i is rows
            ``cu[i]:cu[i+1]``), on the device of q. Their values are not checked (that would sync the GPU): they must
            be non-decreasing and end at ``total``.
        max_seqlen_q, max_seqlen_k: the longest document (an upper bound is fine; it sizes the launch grid).
        causal, softmax_scale: as in :func:`flash_attn_func`; the causal mask is per document.

    Returns:
        ``(total_q, Hq, D)`` in the input dtype. Differentiable in q, k and v.
    """
    name = "flash_attn_varlen_func"
    _check_qkv(name, q, k, v, 3, "(total_tokens, heads, head_dim)")
    for label, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise ValueError(f"igpt.kernels.{name}: {label} must be a 1-D int32 tensor (n_docs + 1,), got {got}")
        if cu.device != q.device:
            raise ValueError(f"igpt.kernels.{name}: {label} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"igpt.kernels.{name}: cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"documents, got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")  # fmt: skip
    for label, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if int(m) < 0:
            raise ValueError(f"igpt.kernels.{name}: {label} must be >= 0, got {m}")
    check_device(name, _attn_fwd, q, k, v)
    return _FlashAttn.apply(
        q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k),
        bool(causal), _scale(softmax_scale, q.shape[-1]),
    )  # fmt: skip
