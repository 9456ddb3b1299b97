"""One-shot GPU check of igpt's Triton kernels: correctness at full sizes, then speed and memory against torch.

    python bench/kernel_speed.py [--budget-s 200] [--quick] [--full] [--skip correctness,loss,attention]
    python bench/kernel_speed.py --dry-run     # no GPU: CPU, Triton interpreter, tiny sizes; checks the plumbing only

Imports only torch, triton and igpt.kernels (flash-attn when installed), so it runs on a bare GPU machine. Prints
three tables:

1. correctness at full sizes against a float32 torch reference (``igpt.kernels.reference``): flash attention output
   and dq/dk/dv (flash-attention's rule: our error <= 2x the error of torch SDPA-flash in bf16, plus a small floor),
   packed documents, head dim 256, fp32 inputs; cross-entropy and fused linear cross-entropy loss and gradients. This
   section runs with one launch configuration per kernel (``IGPT_KERNELS_AUTOTUNE=0``: no tuning sweep per shape),
   and the autotuners start afresh after it.
2. attention TFLOP/s, bf16, causal, B*S = 16k tokens, 2048 model width (H = 2048 / D), S = 1k, 4k, 16k, D = 128 and
   64, forward and forward+backward, for igpt's kernel, torch SDPA's flash and cuDNN backends and the ``flash_attn``
   package (when installed), measured in the same run; ``--full`` adds S = 2k, 8k and non-causal rows. FLOPs:
   4*B*S^2*H*D forward, halved when causal; backward 2.5x forward; forward+backward 3.5x forward.
3. linear + cross-entropy forward+backward time and peak memory above the inputs at V = 32k and 128k, 16k tokens,
   hidden 4096, bf16: torch eager (``F.cross_entropy(F.linear(h, w).float(), t)``, as Hugging Face models compute
   it), the same under ``torch.compile``, and igpt's fused kernel; plus the standalone cross-entropy on given logits.

The targets from the issue are printed beside the numbers: attention fwd+bwd >= 1.1x SDPA-flash at S >= 4k, D = 128,
causal; fused linear CE peak memory <= 1/8 of torch eager's and time <= 1.0x torch.compile's at V = 128k.
Sections stop starting new rows once ``--budget-s`` seconds have passed, so the script ends in time.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # Triton reads this when the kernels are defined, so before igpt.kernels is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from igpt.kernels import cross_entropy, flash_attn_func, flash_attn_varlen_func, fused_linear_cross_entropy  # noqa: E402
from igpt.kernels.reference import (  # noqa: E402
    attention_ref,
    attention_varlen_ref,
    cross_entropy_ref,
    linear_cross_entropy_ref,
)

DEV = "cpu" if DRY_RUN else "cuda"
T0 = time.time()
FAILURES: list[str] = []


def elapsed() -> float:
    return time.time() - T0


def line(*cols: object, widths: tuple[int, ...]) -> None:
    print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cols, widths))),
          flush=True)  # fmt: skip


def bench_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median time of ``fn`` in ms (CUDA events, L2 flushed by triton.testing.do_bench); a single timed call in a
    dry run."""
    if DRY_RUN:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def reset_peak() -> int:
    """Reset the peak-memory counter; returns the bytes allocated now (0 on CPU, where nothing is measured)."""
    if DEV != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if DEV == "cuda" else 0


def set_autotune(enabled: bool) -> None:
    """Turn the tuning sweep on or off and forget what the autotuners chose (their pruning reads the variable)."""
    from igpt.kernels import flash_attn as fa

    os.environ["IGPT_KERNELS_AUTOTUNE"] = "1" if enabled else "0"
    for kernel in (fa._attn_fwd, fa._attn_bwd_dkdv, fa._attn_bwd_dq):
        if hasattr(kernel, "cache"):
            kernel.cache.clear()


# ----------------------------------------------------------------------------------------------------------------------
# 1. Correctness at full sizes
# ----------------------------------------------------------------------------------------------------------------------
def _attn_grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


def _sdpa(q, k, v, causal, backend):
    """torch SDPA on (B, S, H, D) tensors; GQA by repeating k/v heads; returns (B, S, H, D)."""
    from torch.nn.attention import sdpa_kernel

    rep = q.shape[2] // k.shape[2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def check_rule(name: str, ours, ref, lowp, floor_rel: float) -> str:
    """flash-attention's rule per tensor; returns the worst ratio err / allowed and records failures."""
    worst = 0.0
    for label, a, r, lp in zip(("out", "dq", "dk", "dv"), ours, ref, lowp):
        err = (a.float() - r.float()).abs().max().item()
        base = (lp.float() - r.float()).abs().max().item()
        allowed = 2 * base + floor_rel * max(1.0, r.float().abs().max().item())
        ratio = err / allowed
        worst = max(worst, ratio)
        if not ratio <= 1.0:
            FAILURES.append(f"{name} {label}: error {err:.3e} > allowed {allowed:.3e} (torch's {base:.3e})")
    return f"{worst:.2f}"


def _attn_case(name, b, sl, hq, hkv, d, causal, dtype, randn, widths) -> None:
    from torch.nn.attention import SDPBackend

    t = time.time()
    q, k, v = randn(b, sl, hq, d, dtype=dtype), randn(b, sl, hkv, d, dtype=dtype), randn(b, sl, hkv, d, dtype=dtype)
    do = randn(b, sl, hq, d, dtype=dtype)

    def ours_fn(a, b_, c):
        return flash_attn_func(a, b_, c, causal=causal)

    def ref_fn(a, b_, c):
        return attention_ref(a, b_, c, causal=causal)

    def lowp_fn(a, b_, c):
        return attention_ref(a, b_, c, causal=causal, upcast=False)

    def sdpa_fn(a, b_, c):
        return _sdpa(a, b_, c, causal, SDPBackend.FLASH_ATTENTION)

    ours = _attn_grads(ours_fn, q, k, v, do)
    if dtype == torch.float32:  # torch's own fp32 computation against a float64 reference
        ref = _attn_grads(ref_fn, *(x.double() for x in (q, k, v, do)))
        lowp = _attn_grads(lowp_fn, q, k, v, do)
        floor = 1e-5
    else:  # torch SDPA-flash in the input dtype; torch's plain low-precision math if flash refuses the shape
        ref = _attn_grads(ref_fn, *(x.float() for x in (q, k, v, do)))
        try:
            lowp = _attn_grads(sdpa_fn, q, k, v, do)
        except RuntimeError:
            lowp = _attn_grads(lowp_fn, q, k, v, do)
        floor = 1e-3
    line(name, check_rule(name, ours, ref, lowp, floor), f"{time.time() - t:.1f}", widths=widths)


def correctness(quick: bool) -> None:
    print("\n== correctness at full sizes (ratio = our error / allowed error; <= 1 passes) ==", flush=True)
    widths = (58, 8, 9)
    line("case", "ratio", "time_s", widths=widths)
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    set_autotune(False)
    try:
        _correctness(quick, dev, g, widths)
    finally:
        set_autotune(True)


def _correctness(quick: bool, dev: str, g: torch.Generator, widths: tuple[int, ...]) -> None:

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=dev, generator=g, dtype=torch.float32).to(dtype)

    # dry run: the same cases at sizes the CPU interpreter runs in seconds
    b, s, h, s256, h256, s80 = (1, 24, 2, 20, 2, 17) if DRY_RUN else (2, 2048 if quick else 4096, 16, 1000, 8, 777)
    cases = [
        (f"attn B={b} S={s} Hq={h} Hkv={h // 2} D=128 causal bf16", b, s, h, h // 2, 128, True, torch.bfloat16),
        (f"attn B={b} S={s} Hq={h} Hkv={h} D=64 non-causal bf16", b, s, h, h, 64, False, torch.bfloat16),
        (f"attn B=1 S={s256} Hq={h256} Hkv=2 D=256 causal fp16", 1, s256, h256, 2, 256, True, torch.float16),
        (f"attn B=1 S={s80} Hq=4 Hkv=4 D=80 non-causal fp32", 1, s80, 4, 4, 80, False, torch.float32),
    ]
    for case in cases:
        _attn_case(*case, randn=randn, widths=widths)
        empty_cache()

    # Packed documents: per-document reference; torch's low-precision error from the bf16 math reference.
    t = time.time()
    lengths = [1, 7, 16] if DRY_RUN else ([1, 17, 100, 1000, 930] if quick else [1, 17, 100, 1000, 3000, 4074])
    cu = torch.tensor([0] + lengths, device=dev).cumsum(0).to(torch.int32)
    total, m = int(cu[-1]), max(lengths)
    q, k, v, do = randn(total, 8, 64), randn(total, 4, 64), randn(total, 4, 64), randn(total, 8, 64)
    ours = _attn_grads(lambda a, b_, c: flash_attn_varlen_func(a, b_, c, cu, cu, m, m, causal=True), q, k, v, do)
    ref = _attn_grads(lambda a, b_, c: attention_varlen_ref(a, b_, c, cu, cu, causal=True),
                      *(x.float() for x in (q, k, v, do)))  # fmt: skip
    lowp = _attn_grads(lambda a, b_, c: attention_varlen_ref(a, b_, c, cu, cu, causal=True, upcast=False), q, k, v, do)
    name = f"varlen {len(lengths)} docs total={total} Hq=8 Hkv=4 D=64 causal bf16"
    line(name, check_rule(name, ours, ref, lowp, 4e-3), f"{time.time() - t:.1f}", widths=widths)
    del q, k, v, do, ours, ref, lowp

    # Cross-entropy on bf16 logits and the fused version, against the fp32 reference; ratio = error / tolerance.
    for v_size in (300,) if DRY_RUN else ((32768,) if quick else (32768, 131072)):
        t = time.time()
        n = 16 if DRY_RUN else 4096
        logits = (randn(n, v_size) * 2).requires_grad_()
        target = torch.randint(0, v_size, (n,), device=dev, generator=g)
        target[::7] = -100
        kw = dict(label_smoothing=0.1, z_loss=1e-4)
        loss = cross_entropy(logits, target, **kw)
        (grad,) = torch.autograd.grad(loss, logits)
        ref_logits = logits.detach().float().requires_grad_()
        ref = cross_entropy_ref(ref_logits, target, **kw)
        (ref_grad,) = torch.autograd.grad(ref, ref_logits)
        ratio = max(abs(loss.item() - ref.item()) / (1e-4 * abs(ref.item())),
                    (grad.float() - ref_grad).abs().max().item() / (1e-2 * ref_grad.abs().max().item()))  # fmt: skip
        name = f"cross_entropy N={n} V={v_size} bf16 eps=0.1 z=1e-4"
        if not ratio <= 1.0:
            FAILURES.append(f"{name}: ratio {ratio:.2f}")
        line(name, f"{ratio:.2f}", f"{time.time() - t:.1f}", widths=widths)
        del logits, grad, ref_logits, ref_grad

    for reduction in ("mean", "none"):
        t = time.time()
        n, h, v_size = (16, 32, 300) if DRY_RUN else ((4096, 2048, 32768) if quick else (16384, 4096, 32768))
        hidden = randn(n, h).requires_grad_()
        weight = (randn(v_size, h) / math.sqrt(h)).requires_grad_()
        target = torch.randint(0, v_size, (n,), device=dev, generator=g)
        target[::5] = -100
        kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
        loss = fused_linear_cross_entropy(hidden, weight, target, **kw)
        go = torch.randn_like(loss) if reduction == "none" else torch.ones_like(loss)
        gh, gw = torch.autograd.grad(loss, (hidden, weight), go)
        # torch's answer: the same bf16 linear, cross-entropy on the upcast logits (reference.py's definition).
        h_ref, w_ref = (x.detach().clone().requires_grad_() for x in (hidden, weight))
        ref = linear_cross_entropy_ref(h_ref, w_ref, target, **kw)
        rh, rw = (x.float() for x in torch.autograd.grad(ref, (h_ref, w_ref), go))
        ratio = max(
            (loss - ref).abs().max().item() / (2e-3 * max(1.0, ref.abs().max().item())),
            (gh.float() - rh).abs().max().item() / (2e-2 * rh.abs().max().item()),
            (gw.float() - rw).abs().max().item() / (2e-2 * rw.abs().max().item()),
        )
        name = f"fused_linear_ce N={n} H={h} V={v_size} bf16 {reduction}"
        if not ratio <= 1.0:
            FAILURES.append(f"{name}: ratio {ratio:.2f}")
        line(name, f"{ratio:.2f}", f"{time.time() - t:.1f}", widths=widths)
        del hidden, weight, gh, gw, h_ref, w_ref, rh, rw, ref, loss
        empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# 2. Attention throughput
# ----------------------------------------------------------------------------------------------------------------------
def _flash_attn_package():
    """``flash_attn.flash_attn_func`` when the flash-attn package is installed, else None."""
    try:
        from flash_attn import flash_attn_func as fa_func
    except ImportError:
        return None
    return fa_func


def _attn_speed_row(s: int, d: int, causal: bool, tokens: int, width: int) -> dict[str, tuple[float, float] | None]:
    """TFLOP/s (forward, forward+backward) of each implementation at one shape."""
    from torch.nn.attention import SDPBackend

    b, h = max(1, tokens // s), width // d
    q = torch.randn(b, s, h, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)  # (B, S, H, D)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    do = torch.randn_like(q)
    flops_fwd = 4 * b * s * s * h * d / (2 if causal else 1)
    impls = {
        "igpt": lambda: flash_attn_func(q, k, v, causal=causal),
        "sdpa-flash": lambda: _sdpa(q, k, v, causal, SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": lambda: _sdpa(q, k, v, causal, SDPBackend.CUDNN_ATTENTION),
    }
    fa_func = _flash_attn_package()
    if fa_func is not None:
        impls["flash-attn"] = lambda: fa_func(q, k, v, causal=causal)
    res: dict[str, tuple[float, float] | None] = {}
    for name, fn in impls.items():

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(), (q, k, v), do)

        try:
            with torch.no_grad():
                t_f = bench_ms(fn)
            t_fb = bench_ms(fwd_bwd)
            res[name] = (flops_fwd / t_f / 1e9, 3.5 * flops_fwd / t_fb / 1e9)
        except Exception as exc:  # an SDPA backend may not support a shape (or a device): report it, keep going
            res[name] = None
            print(f"  {name} S={s} D={d} causal={causal}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    return res


def attention_speed(budget_s: float, quick: bool, full: bool) -> None:
    tokens, width = (32, 128) if DRY_RUN else (16384, 2048)
    print(f"\n== attention TFLOP/s, bf16, B*S = {tokens} tokens, H = {width} / D (fwd | fwd+bwd) ==", flush=True)
    if _flash_attn_package() is None:
        print("  (the flash-attn package is not installed: its column shows n/a)", flush=True)
    widths = (24, 15, 15, 15, 15, 10)
    line("S D mask", "igpt", "sdpa-flash", "sdpa-cudnn", "flash-attn", "igpt/sdpa", widths=widths)
    if DRY_RUN:
        seqlens: tuple[int, ...] = (32,)
    else:
        seqlens = (1024, 4096) if quick else ((1024, 2048, 4096, 8192, 16384) if full else (1024, 4096, 16384))
    shapes = [(128, True), (64, True)] + ([(128, False), (64, False)] if full else [])

    def fmt(r: tuple[float, float] | None) -> str:
        return "n/a" if r is None else f"{r[0]:6.0f} | {r[1]:6.0f}"

    for d, causal in shapes:
        for s in seqlens:
            if elapsed() > budget_s:
                print(f"  (stopped: time budget of {budget_s:.0f}s used)", flush=True)
                return
            res = _attn_speed_row(s, d, causal, tokens, width)
            empty_cache()
            speedup = "n/a"
            if res.get("igpt") and res.get("sdpa-flash"):
                speedup = f"{res['igpt'][1] / res['sdpa-flash'][1]:.2f}x"
                if d == 128 and causal and s >= 4096:
                    speedup += " *" if res["igpt"][1] >= 1.1 * res["sdpa-flash"][1] else " !"
            line(f"S={s} D={d} {'causal' if causal else 'full'}", *(fmt(res.get(k)) for k in
                 ("igpt", "sdpa-flash", "sdpa-cudnn", "flash-attn")), speedup, widths=widths)  # fmt: skip
    print("  igpt/sdpa is the fwd+bwd ratio to SDPA-flash; target >= 1.1x at S >= 4k, D = 128, causal "
          "(* met, ! not met)")


# ----------------------------------------------------------------------------------------------------------------------
# 3. Linear + cross-entropy time and memory
# ----------------------------------------------------------------------------------------------------------------------
def _measure(fn, reps: int) -> tuple[float, float]:
    """(median ms, peak GiB allocated above what was allocated before) of ``fn`` (forward+backward)."""
    fn()  # warm-up (and compile)
    sync()
    empty_cache()
    base = reset_peak()
    fn()
    sync()
    peak = (peak_bytes() - base) / 2**30
    return bench_ms(fn, warmup=2, rep=reps), peak


def _loss_rows(v_size: int, n: int, hdim: int, compiled, widths: tuple[int, ...]) -> None:
    hidden = (torch.randn(n, hdim, device=DEV) / 2).to(torch.bfloat16).requires_grad_()  # (N, H)
    weight = (torch.randn(v_size, hdim, device=DEV) / math.sqrt(hdim)).to(torch.bfloat16).requires_grad_()  # (V, H)
    target = torch.randint(0, v_size, (n,), device=DEV)
    impls = {
        "torch eager": lambda: torch.autograd.grad(_torch_loss(hidden, weight, target), (hidden, weight)),
        "torch.compile": lambda: torch.autograd.grad(compiled(hidden, weight, target), (hidden, weight)),
        "igpt fused_linear_cross_entropy": lambda: torch.autograd.grad(
            fused_linear_cross_entropy(hidden, weight, target), (hidden, weight)
        ),
    }
    rows: dict[str, tuple[float, float]] = {}
    for name, fn in impls.items():
        try:
            t = time.time()
            rows[name] = _measure(fn, reps=20)
            line(f"V={_vocab(v_size)} {name}", f"{rows[name][0]:.1f}", f"{rows[name][1]:.2f}", widths=widths)
            if name == "torch.compile":
                print(f"  (torch.compile warm-up and measurement took {time.time() - t:.0f}s)", flush=True)
        except Exception as exc:
            print(f"  V={v_size} {name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        empty_cache()
    eager, comp, ours = (rows.get(k) for k in impls)
    if ours and eager:
        msg = f"  V={_vocab(v_size)}: igpt peak = 1/{eager[1] / max(ours[1], 1e-9):.1f} of eager's"
        if comp:
            msg += f", time = {ours[0] / comp[0]:.2f}x torch.compile's, {ours[0] / eager[0]:.2f}x eager's"
        if v_size == 131072:
            ok = eager[1] >= 8 * ours[1] and comp is not None and ours[0] <= comp[0]
            msg += " (target: <= 1/8 memory, <= 1.0x compile time: " + ("met)" if ok else "NOT met)")
        print(msg, flush=True)
    # Standalone cross-entropy on given logits (N x V, bf16): ours against torch on the upcast logits.
    logits = F.linear(hidden.detach(), weight.detach()).requires_grad_()  # (N, V)
    impls.clear()
    hidden = weight = None  # free them (the closures above share these cells) before measuring memory again
    standalone = {
        "torch F.cross_entropy(x.float())": lambda: torch.autograd.grad(
            F.cross_entropy(logits.float(), target), logits
        ),
        "igpt cross_entropy(x)": lambda: torch.autograd.grad(cross_entropy(logits, target), logits),
    }
    for name, fn in standalone.items():
        ms, peak = _measure(fn, reps=20)
        line(f"V={_vocab(v_size)} {name}", f"{ms:.1f}", f"{peak:.2f}", widths=widths)


def _vocab(v: int) -> str:
    return f"{v // 1024}k" if v >= 1024 else str(v)


def _torch_loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), t)


def loss_speed(budget_s: float, quick: bool) -> None:
    print("\n== linear + cross-entropy fwd+bwd, bf16, N = 16k tokens, H = 4096 (time ms, peak GiB above inputs) ==",
          flush=True)  # fmt: skip
    if DRY_RUN:
        print("  (dry run: N = 16, H = 32, V = 300 / 1000 on CPU; memory is not measured)", flush=True)
    widths = (40, 11, 11)
    line("case", "ms", "peak_GiB", widths=widths)
    n, hdim = (16, 32) if DRY_RUN else ((4096, 4096) if quick else (16384, 4096))
    # dry run: dynamo's tracing path without Inductor's C++ build, which takes minutes on a small CPU
    compiled = torch.compile(_torch_loss, dynamic=False, backend="eager" if DRY_RUN else "inductor")
    for v_size in (300, 1000) if DRY_RUN else (32768, 131072):
        if elapsed() > budget_s:
            print(f"  (stopped: time budget of {budget_s:.0f}s used)", flush=True)
            return
        _loss_rows(v_size, n, hdim, compiled, widths)
        empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=200.0, help="stop starting new rows after this many s")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke test)")
    parser.add_argument("--full", action="store_true", help="also S = 2k, 8k and non-causal attention")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: correctness,attention,loss")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: CPU, Triton interpreter, tiny sizes")
    args = parser.parse_args()
    if DRY_RUN:
        print(f"dry run on CPU (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}); torch {torch.__version__}, "
              f"triton {triton.__version__}: sizes are tiny and the numbers mean nothing", flush=True)  # fmt: skip
    elif not torch.cuda.is_available():
        print("bench/kernel_speed.py needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run checks the "
              "plumbing on CPU", file=sys.stderr)  # fmt: skip
        return 2
    else:
        props = torch.cuda.get_device_properties(0)
        print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
              f"triton {triton.__version__}", flush=True)  # fmt: skip
    skip = set(filter(None, args.skip.split(",")))
    sections = [
        ("correctness", lambda: correctness(args.quick)),
        ("loss", lambda: loss_speed(args.budget_s, args.quick)),
        ("attention", lambda: attention_speed(args.budget_s, args.quick, args.full)),
    ]
    for name, fn in sections:
        if name in skip:
            continue
        t = time.time()
        try:
            fn()
        except Exception as exc:  # keep going so one broken section does not hide the others' numbers
            FAILURES.append(f"section {name} raised {type(exc).__name__}: {exc}")
            print(f"  section {name} raised {type(exc).__name__}: {exc}", flush=True)
        print(f"  [{name}: {time.time() - t:.0f}s, total {elapsed():.0f}s]", flush=True)
    if FAILURES:
        print("\nFAILED checks:\n  " + "\n  ".join(FAILURES), flush=True)
        return 1
    print("\nall correctness checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
