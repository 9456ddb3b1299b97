"""Ahead-of-time compile of every launch configuration of igpt's Triton kernels for a CUDA target, without a GPU.

``triton.compile`` takes a ``GPUTarget``, and Triton ships ``ptxas`` and ``cuobjdump`` for its NVIDIA backend, so a
CPU machine can build the exact cubins a GPU would run and read their resources: registers per thread, spill
stores/loads (``ptxas -v``), stack and local memory, and shared memory. The compile path is the one of Triton's own
ahead-of-time tool (``triton/tools/compile.py``: an ``ASTSource`` with the launch's signature and specialisation,
``triton.compile`` for a ``GPUTarget``). CI runs it to keep every configuration that autotuning may pick free of
register spills on sm_80 (A100) and sm_90 (H100/H200).

Each :class:`Job` mirrors one launch of the host code in ``flash_attn.py`` / ``cross_entropy.py``: the same argument
list (meta tensors stand in for the real ones, so pointer alignment and stride divisibility specialise exactly as
on the GPU), the same constexpr flags and one autotune configuration.

    python -m igpt.kernels.aot          # every configuration at D = 64/128, sm_80 and sm_90, bf16, causal: the table
    python -m igpt.kernels.aot --head-dims 64,128,256 --dtypes bf16,fp16 --variants causal,varlen,full --json out.json

"may pick" marks the configurations the autotuner's pruning keeps for that architecture (:func:`pickable`: the
kernel's table for the architecture and head dim, within its shared memory): only those can ever run there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) per compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ATTN_KERNELS = ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")
CE_KERNELS = ("ce_fwd", "ce_bwd", "flce_fwd_grad")
# Cross-entropy launches: the vocabulary sets BLOCK_V and num_warps (4096: tiny; 128256: llama_1b/8b, as gpt2_124m's
# 50304: BLOCK_V 8192, 16 warps) and whether the row length specialises as a multiple of 16 (50257, GPT-2's own: not).
CE_VOCABS = (4096, 128256, 50257)


@dataclass(frozen=True)
class Job:
    """One compile: a kernel, one launch configuration, one target."""

    kernel: str  # attn_fwd | attn_bwd_dkdv | attn_bwd_dq | ce_fwd | ce_bwd | flce_fwd_grad
    arch: int  # compute capability, 80 or 90
    dtype: str  # bf16 | fp16
    head_dim: int  # attention head dim; for the cross-entropy kernels the vocabulary size
    variant: str  # causal | varlen (causal, packed documents) | full (non-causal); "-" for cross-entropy
    config: tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages); (BLOCK_V, 0, warps, 1) for CE
    may_pick: bool  # the autotuner's pruning keeps it on this architecture
    group: int = 2  # query heads per key/value head (2: the grouped-query loop is not specialised away)


@dataclass
class Result:
    job: Job
    regs: int = 0
    spill_stores: int = 0  # bytes, from ptxas -v
    spill_loads: int = 0
    stack: int = 0  # bytes of stack frame per thread (cuobjdump)
    local: int = 0
    shared: int = 0  # bytes: Triton's dynamic shared memory plus the cubin's static shared memory
    smem_limit: int = 0
    seconds: float = 0.0
    error: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def fits(self) -> bool:
        return not self.error and self.shared <= self.smem_limit


def pickable(kind: str, arch: int, block_d: int, esize: int = 2) -> list[tuple[int, int, int, int]]:
    """The configurations the autotuner's pruning keeps on ``sm_<arch>`` (``flash_attn._make_prune`` with the
    architecture's shared memory): only these can ever run there."""
    from . import flash_attn as fa

    shapes = fa.shapes_for(kind, arch, block_d, esize)
    kept = [s for s in shapes if fa.smem_estimate(kind, s[0], s[1], s[3], block_d, esize) <= SMEM_LIMIT[arch]]
    return kept or [min(shapes, key=lambda s: s[0] * s[1] * s[3])]


def attention_jobs(archs, dtypes, head_dims, variants, only_may_pick: bool = False, group: int = 2) -> list[Job]:
    """The three attention kernels' configurations for each target and shape class: those autotuning may pick there
    (``only_may_pick``), or every configuration of the kernel's tables, marked by whether it may be picked."""
    from . import flash_attn as fa

    kinds = {"attn_fwd": "fwd", "attn_bwd_dkdv": "dkdv", "attn_bwd_dq": "dq"}
    jobs = []
    for kernel, kind in kinds.items():
        every = list(dict.fromkeys(s for by_dim in fa.SHAPES[kind].values() for dim in by_dim.values() for s in dim))
        for arch in archs:
            for dtype in dtypes:
                for d in head_dims:
                    bd = max(16, 1 << (d - 1).bit_length())
                    picks = pickable(kind, arch, bd)
                    for variant in variants:
                        for cfg in picks if only_may_pick else every:
                            jobs.append(Job(kernel, arch, dtype, d, variant, tuple(cfg), cfg in picks, group))
    return jobs


def ce_jobs(archs, dtypes, vocabs=CE_VOCABS) -> list[Job]:
    """The cross-entropy row kernels at the launch settings the host code picks for these vocabularies."""
    from .cross_entropy import block_v, ce_launch_warps

    jobs = []
    for kernel in CE_KERNELS:
        for arch in archs:
            for dtype in dtypes:
                for vocab in vocabs:
                    bv = block_v(vocab)
                    jobs.append(Job(kernel, arch, dtype, vocab, "-", (bv, 0, ce_launch_warps(bv), 1), True, 0))
    return jobs


# ----------------------------------------------------------------------------------------------------------------------
# Building one launch's arguments (as the host code in flash_attn.py / cross_entropy.py passes them)
# ----------------------------------------------------------------------------------------------------------------------
def _attention_launch(job: Job):
    import torch

    from . import flash_attn as fa

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[job.dtype]
    d, group = job.head_dim, job.group
    bd = max(16, 1 << (d - 1).bit_length())
    hkv, seq, batch = 8, 4096, 2
    hq = hkv * group
    varlen = job.variant == "varlen"

    def meta(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta")

    if varlen:
        total = batch * seq
        q, k = meta(total, hq, d), meta(total, hkv, d)  # (total, H, D)
        lse = meta(hq, total, dtype=torch.float32)  # (Hq, total)
        cu = meta(batch + 1, dtype=torch.int32)

        def s3(t):
            return (0, *t.stride()[:2])

        ls = (0, lse.stride(0))
        fixed = (0, 0)
    else:
        q, k = meta(batch, seq, hq, d), meta(batch, seq, hkv, d)  # (B, S, H, D)
        lse = meta(batch, hq, seq, dtype=torch.float32)  # (B, Hq, S)
        cu = lse

        def s3(t):
            return t.stride()[:3]

        ls = lse.stride()[:2]
        fixed = (seq, seq)
    scale = d**-0.5
    bm, bn, warps, stages = job.config
    const = dict(HEAD_DIM=d, BLOCK_D=bd, IS_CAUSAL=job.variant != "full", IS_VARLEN=varlen, HAS_D_PAD=bd != d,
                 IS_DOT_FP32=False, DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                 num_stages=stages)  # fmt: skip
    bucket = fa._seqlen_bucket(seq)
    if job.kernel == "attn_fwd":
        args = (q, k, k, q, lse, cu, cu, scale * fa.LOG2E, *s3(q), *s3(k), *s3(k), *s3(q), *ls, *fixed, group, bucket)
        return fa._attn_fwd.fn, args, const
    if job.kernel == "attn_bwd_dkdv":  # dK, dV per query head: fp32 partials when group > 1
        dkv = q if group == 1 else meta(*q.shape, dtype=torch.float32)
        args = (q, k, k, q, dkv, dkv, lse, lse, cu, cu, scale * fa.LOG2E, scale, *s3(q), *s3(k), *s3(k), *s3(q),
                *s3(dkv), *s3(dkv), *ls, *fixed, group, bucket)  # fmt: skip
        return fa._attn_bwd_dkdv.fn, args, const
    args = (q, k, k, q, q, lse, lse, cu, cu, scale * fa.LOG2E, scale, *s3(q), *s3(k), *s3(k), *s3(q), *s3(q), *ls,
            *fixed, group, bucket)  # fmt: skip
    return fa._attn_bwd_dq.fn, args, const


def _ce_launch(job: Job):
    import torch

    ce = importlib.import_module(f"{__package__}.cross_entropy")  # the package exports a function of that name

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[job.dtype]
    n, vocab = 4096, job.head_dim
    bv, _, warps, _ = job.config
    x = torch.empty(n, vocab, dtype=dt, device="meta")  # (N, V) logits
    t = torch.empty(n, dtype=torch.int64, device="meta")
    f = torch.empty(n, dtype=torch.float32, device="meta")
    flags = dict(BLOCK_V=bv, HAS_SMOOTHING=True, HAS_Z_LOSS=True, num_warps=warps)
    if job.kernel == "ce_bwd":
        return ce._ce_bwd_kernel, (x, x.stride(0), t, f, x, x.stride(0), f, 1, vocab, -100, 0.1, 1e-4), flags
    grad = job.kernel == "flce_fwd_grad"
    args = (x, x.stride(0), t, f, f, x, x.stride(0), f, vocab, -100, 0.1, 1e-4)
    return ce._ce_fwd_kernel, args, {**flags, "RETURN_GRAD": grad}


_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(fn, args: tuple, kwargs: dict, arch: int) -> dict[str, int]:
    """Compile ``fn[grid](*args, **kwargs)`` for ``sm_<arch>`` as a launch would, without a GPU; returns the cubin's
    ``regs``, ``spill_stores``, ``spill_loads``, ``stack``, ``local`` and ``shared`` (bytes). Needs
    ``TRITON_DUMP_PTXAS_LOG=1`` in the environment for the spill counts (see :func:`_worker_init`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(fn, JITFunction):
        raise TypeError(f"{getattr(fn, '__name__', fn)} is a {type(fn).__name__}, not a JITFunction: the kernels were "
                        "imported with TRITON_INTERPRET=1; compile in a process started without it")  # fmt: skip
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: the ptxas -v report goes to stdout
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    spills = _SPILL.findall(log.getvalue())
    if not spills:
        raise RuntimeError("no ptxas -v report captured (is TRITON_DUMP_PTXAS_LOG=1 set?)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    m = _RESOURCE.search(out.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump --dump-resource-usage printed no REG/STACK/SHARED/LOCAL line:\n{out.stdout}")
    regs, stack, static_shared, local = (int(x) for x in m.groups())
    return {"regs": regs, "spill_stores": sum(int(s) for s, _ in spills), "spill_loads": sum(int(s) for _, s in spills),
            "stack": stack, "local": local, "shared": int(kernel.metadata.shared) + static_shared}


def compile_job(job: Job) -> Result:
    """Compile one job for its target and read the cubin's resources (runs in a worker process)."""
    res = Result(job, smem_limit=SMEM_LIMIT[job.arch])
    t0 = time.perf_counter()
    try:
        fn, args, kwargs = _attention_launch(job) if job.kernel.startswith("attn") else _ce_launch(job)
        for key, value in compile_launch(fn, args, kwargs, job.arch).items():
            setattr(res, key, value)
    except Exception as exc:  # reported per job; the caller decides whether it fails the check
        first = str(exc).strip().splitlines()
        res.error = f"{type(exc).__name__}: {first[0] if first else ''}"
    res.seconds = time.perf_counter() - t0
    return res


def _worker_init(cache_dir: str) -> None:
    # A fresh cache per run: a cache hit would skip ptxas and its spill report, and could hide a regression.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def compile_all(jobs: list[Job], workers: int | None = None) -> list[Result]:
    """Compile ``jobs`` in a process pool (spawned workers, an empty Triton cache); results in job order."""
    import multiprocessing as mp

    workers = workers or os.cpu_count() or 1
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))  # longest first: a short tail
    # Workers inherit the environment when they start, and import the kernels (unpickling compile_job) before their
    # initializer runs: TRITON_INTERPRET=1 (set by the CPU tests) would build them for the interpreter.
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with tempfile.TemporaryDirectory(prefix="igpt-aot-") as cache:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(cache,)) as pool:
                done = dict(zip(order, pool.map(compile_job, [jobs[i] for i in order])))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return [done[i] for i in range(len(jobs))]


def _cost(job: Job) -> int:
    bm, bn, _, stages = job.config
    return job.head_dim * (bm + bn) * max(1, stages) * (2 if job.kernel == "attn_bwd_dkdv" else 1)


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------
def format_table(results: list[Result]) -> str:
    """A Markdown table: one row per (kernel, shape class, config), registers / spill bytes per architecture."""
    archs = sorted({r.job.arch for r in results})
    rows: dict[tuple, dict[int, Result]] = {}
    for r in results:
        j = r.job
        rows.setdefault((j.kernel, j.dtype, j.head_dim, j.variant, j.config), {})[j.arch] = r
    head = ["kernel", "dtype", "D/V", "variant", "config (M, N, warps, stages)"]
    head += [f"sm_{a} regs / spill B / smem KiB" for a in archs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, dtype, d, variant, cfg), by_arch in rows.items():
        cells = [kernel, dtype, str(d), variant, ", ".join(str(c) for c in cfg)]
        for a in archs:
            r = by_arch.get(a)
            if r is None:
                cells.append("")
            elif r.error:
                cells.append(f"error: {r.error[:60]}")
            else:
                mark = "" if r.job.may_pick else " (pruned)"
                cells.append(f"{r.regs} / {r.spills} / {r.shared / 1024:.0f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def problems(results: list[Result], spill_free_max_dim: int = 128) -> list[str]:
    """What the CI check fails on: compile errors, a pickable config over the shared-memory limit, or one that spills
    at head dim <= ``spill_free_max_dim``."""
    out = []
    for r in results:
        j = r.job
        name = f"{j.kernel} sm_{j.arch} {j.dtype} D/V={j.head_dim} {j.variant} config={j.config}"
        if r.error:
            out.append(f"{name}: compile failed: {r.error}")
        elif j.may_pick and not r.fits:
            out.append(f"{name}: needs {r.shared} B of shared memory, sm_{j.arch} has {r.smem_limit} B")
        elif j.may_pick and r.spills and (j.kernel.startswith("ce") or j.kernel.startswith("flce")
                                          or j.head_dim <= spill_free_max_dim):  # fmt: skip
            out.append(f"{name}: spills {r.spill_stores} B stored / {r.spill_loads} B loaded ({r.regs} registers, "
                       f"{r.stack} B stack); expected no spill")  # fmt: skip
    return out


def _csv(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,90", help="compute capabilities (default 80,90)")
    parser.add_argument("--dtypes", default="bf16", help="bf16,fp16")
    parser.add_argument("--head-dims", default="64,128", help="attention head dims, e.g. 64,128,256")
    parser.add_argument("--variants", default="causal", help="causal,varlen,full")
    parser.add_argument("--kernels", default="attn,ce", help="attn, ce, or kernel names (attn_fwd, ce_bwd, ...)")
    parser.add_argument("--group", type=int, default=2, help="query heads per key/value head (1 specialises it away)")
    parser.add_argument("--pickable-only", action="store_true", help="only what autotuning may pick per architecture")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    parser.add_argument("--json", default="", help="also write every result to this JSON file")
    args = parser.parse_args(argv)
    archs, dtypes = _csv(args.archs, int), _csv(args.dtypes)
    wanted = set(_csv(args.kernels))
    jobs = [
        j for j in attention_jobs(archs, dtypes, _csv(args.head_dims, int), _csv(args.variants),
                                  only_may_pick=args.pickable_only, group=args.group)
        if "attn" in wanted or j.kernel in wanted
    ] + [j for j in ce_jobs(archs, dtypes) if "ce" in wanted or j.kernel in wanted]  # fmt: skip
    t0 = time.perf_counter()
    results = compile_all(jobs, args.workers or None)
    print(format_table(results))
    print(f"\n{len(jobs)} compiles in {time.perf_counter() - t0:.0f}s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{**asdict(r), "spills": r.spills} for r in results], f, indent=1)
    bad = problems(results)
    for p in bad:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
