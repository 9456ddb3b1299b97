"""Tests for igpt/plan.py: its per-rank parameter+optimizer bytes against what igpt's strategies really hold, its
traced activation peak against a real run's peak resident memory, its fit from short traces against tracing the full
depth, the micro-batch search, and its command line.

The measured side wraps ``model=tiny`` and ``model=gpt2_124m`` with ``strategy=fsdp`` and ``strategy=zero3`` on 2 gloo
CPU processes (and ``strategy=single`` in one of them, per model), takes one optimizer step on a batch of 1 x 8
tokens so the AdamW state exists, and sums the bytes each rank holds in parameters, master weights and optimizer
state (every storage once, as ``bench/strategies.py`` counts them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

MODELS = ("tiny", "gpt2_124m")
STRATEGIES = ("single", "fsdp", "zero3")


def measure(out: str) -> None:
    """Worker (under torchrun, 2 ranks): wrap, step once, write every rank's bytes per (model, strategy)."""
    import gc

    import torch
    import torch.distributed as dist

    from igpt.config import OptimConfig, StrategyConfig
    from igpt.model import Transformer
    from igpt.parallel import build_strategy
    from igpt.plan import compose

    results: dict[str, dict[str, list[int]]] = {}
    for model_name in MODELS:
        cfg = compose([f"model={model_name}"])[0]
        for name in STRATEGIES:
            if name == "single" and int(os.environ["RANK"]) != MODELS.index(model_name) % 2:
                continue  # one rank per model, so the other goes on to build its next model meanwhile
            torch.manual_seed(0)
            strategy = build_strategy(StrategyConfig(name=name), "fp32", torch.device("cpu"))
            model = strategy.wrap_model(Transformer(cfg.model), OptimConfig())
            ids = torch.randint(0, cfg.model.vocab_size, (1, 8))
            with model.no_sync(True):
                model.backward(model(ids, labels=ids))
            model.clip_and_step(1.0)
            results.setdefault(model_name, {})[name] = model.held_bytes()
            del strategy, model
            gc.collect()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.dist
def test_param_and_optimizer_bytes_match_two_process_measurement(tmp_path):
    from igpt.plan import compose, param_layout, state_memory

    out = str(tmp_path / "measured.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    with open(out, encoding="utf-8") as f:
        ranks = json.load(f)
    rows = []
    for model_name in MODELS:
        for name in STRATEGIES:
            world = 1 if name == "single" else 2
            cfg = compose([f"model={model_name}", f"strategy={name}"])[0]
            state = state_memory(param_layout(cfg.model), cfg, world)
            predicted = state.params + state.optimizer
            for rank, measured in enumerate(r[model_name].get(name) for r in ranks):
                if measured is None:
                    continue
                rows.append((model_name, name, rank, predicted, measured))
    table = "\n".join(f"{m:10} {s:6} rank {r}: predicted {p / 2**20:9.2f} MiB, measured {x / 2**20:9.2f} MiB"
                      for m, s, r, p, x in rows)  # fmt: skip
    print(table)
    assert len(rows) == len(MODELS) * (1 + 2 * (len(STRATEGIES) - 1)), table
    for _, _, _, predicted, measured in rows:
        assert abs(predicted - measured) <= 0.1 * measured, table


RSS_SCRIPT = r"""
import os, re, warnings
import torch
warnings.filterwarnings("ignore")
from igpt.config import ModelConfig
from igpt.model import Transformer
from igpt.parallel.base import apply_activation_checkpointing
from igpt.plan import traced_peak

torch.set_num_threads(1)
cfg = ModelConfig(vocab_size=8192, dim=256, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=768, max_seq_len=2048)
ids = torch.zeros(1, 2048, dtype=torch.long)
def high_water():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024

for regime, checkpointing in (("bf16", True), ("fp32", False)):
    predicted = traced_peak(cfg, 2048, regime, checkpointing, "torch")
    torch.manual_seed(0)
    model = Transformer(cfg)
    if regime == "bf16":
        model.to(torch.bfloat16)
    if checkpointing:
        apply_activation_checkpointing(model)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    model(ids[:, :16], labels=ids[:, :16]).backward()  # warm-up
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    reset = high_water() - base
    model(ids, labels=ids).backward()
    measured = high_water() - base
    print(regime, checkpointing, predicted, measured, reset)
    del model
"""


def test_traced_activations_match_a_real_run():
    """The fake-tensor trace's peak equals the peak resident memory a real CPU run adds, within 5% (fp32 without
    and bf16 weights with activation checkpointing, torch loss, GQA, S = 2048, a 8192-token vocabulary).

    glibc's mmap threshold is fixed at 64 KiB so freed blocks return to the OS and the resident size follows live
    memory (as in ``bench/attention_mask.py``); the kernel's high-water mark (VmHWM) is reset right before the measured
    step (``/proc/self/clear_refs``), so earlier peaks (imports, the trace, the other case) cannot mask this one.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout
    for line in lines:
        regime, checkpointing, predicted, measured, reset = line.split()
        predicted, measured, reset = float(predicted), float(measured), float(reset)
        assert reset < 0.05 * measured, f"{line}: the high-water mark was not reset before the step"
        assert measured == pytest.approx(predicted, rel=0.05), line


SMALL = ["model=tiny", "model.vocab_size=32768", "model.dim=64", "model.n_layers=6", "model.ffn_dim=192",
         "model.max_seq_len=512", "trainer.seq_len=512", "strategy=fsdp", "precision=bf16"]  # fmt: skip


def test_activation_fit_equals_full_depth_traces():
    """The fit from one- and two-block traces equals tracing all 6 blocks, also where the phase holding the peak
    changes with the micro-batch (fused loss: its fp32 accumulator early, a block's recomputation later)."""
    from igpt.plan import activations, compose, traced_peak

    model = compose(SMALL)[0].model
    act = activations(model, 512, "bf16", True, "triton")
    assert act.lines[0] != pytest.approx(act.lines[1]), "this case should have two phases"
    for m in (3, 8):
        assert act.at(m) == pytest.approx(traced_peak(model, 512, "bf16", True, "triton", m), rel=0.01), m
    assert act.per_layer == 512 * model.dim * 2  # checkpointing keeps one (N, dim) bf16 input per block


def test_plan_micro_batch_and_fused_loss_drops_the_logits():
    from igpt.plan import activations, compose, make_plan

    cfg = compose(SMALL)[0]
    plan = make_plan(cfg, world_size=8, gpu_memory_gb=4.5)
    n, v, h = 512, cfg.model.vocab_size, cfg.model.dim
    # torch loss: bf16 logits, their fp32 copy and fp32 gradient for every sequence; the fused loss holds no (N, V)
    # tensor, but its fp32 grad_weight accumulator once per micro-batch
    torch_ac = plan.activations_ac
    assert torch_ac.per_sequence >= n * v * (2 + 4 + 4)
    fused = activations(cfg.model, n, "bf16", True, "triton")
    assert fused.per_sequence < 0.05 * torch_ac.per_sequence
    assert fused.at(1) - fused.per_sequence >= v * h * 4
    m = plan.max_micro_batch(True)
    assert m >= 2 and plan.total(m, True) <= plan.usable < plan.total(m + 1, True)
    assert plan.max_micro_batch(False) <= m
    assert plan.n_params == 2 * v * h + h + 6 * (2 * h * h + 2 * h * (h // 2) + 3 * h * 192 + 2 * h)  # GQA: kv h/2


def test_cli_prints_the_plan_and_errors_name_the_key(capsys):
    from igpt.plan import compose, main, make_plan

    main(["model=tiny", "strategy=fsdp", "world_size=2", "gpu_memory_gb=16"])
    out = capsys.readouterr().out
    for text in ("parameters", "optimizer state", "activations with AC", "largest micro-batch", "tokens/s per GPU"):
        assert text in out, out
    with pytest.raises(SystemExit):
        main(["model=tiny", "trainer.seq_lenn=4"])
    assert "trainer.seq_lenn" in capsys.readouterr().err
    with pytest.raises(ValueError, match="world_size='two': expected a int"):
        compose(["world_size=two"])
    cfg, _ = compose(["model=tiny"])
    for kwargs, key in ((dict(mfu=1.5), "mfu"), (dict(gpu="Z80"), "peak_tflops"), (dict(world_size=2), "single")):
        with pytest.raises(ValueError, match=key):
            make_plan(cfg, **kwargs)


if __name__ == "__main__":
    measure(sys.argv[1])
