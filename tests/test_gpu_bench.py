"""bench/gpu.sh's dry run: the one-shot GPU script's plumbing (wheels, imports, the kernel benchmark, data preparation,
the training runs through igpt/train.py and their table) on CPU at tiny sizes, so the first GPU run does not fail on
a typo."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_sh_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "IGPT_GPU_BUDGET_S": "300"}
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its own processes
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    assert "all steps passed" in text and "MISSING" not in text
    bench = (out / "bench.log").read_text()
    assert "all correctness checks passed" in bench
    for case in ("attn B=1 S=24 Hq=2 Hkv=1 D=128 causal bf16", "varlen 3 docs", "fused_linear_ce", "S=32 D=128 causal",
                 "S=32 D=64 causal", "V=1000 igpt fused_linear_cross_entropy", "V=1000 torch.compile"):
        assert case in bench, case
    train = (out / "train.log").read_text()
    rows = [line.split() for line in train.splitlines() if line.startswith(("gpt2_124m ", "llama_1b "))]
    assert [r[:3] for r in rows] == [["gpt2_124m", "triton", "2"], ["llama_1b", "sdpa/torch", "2"]], train
    for row in rows:
        assert float(row[3].replace(",", "")) > 0  # tokens/s
