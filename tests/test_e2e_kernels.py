"""End to end: a tiny model trained with igpt's Triton kernels (attention and fused linear cross-entropy) follows
the sdpa/torch run within fp32 tolerance. On CPU the kernels run under TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, TINY
from tests.trainutil import read_metrics


def _train(data_dir: str, run_dir: str, attention: str, loss: str, stage: str = "pretrain") -> dict[int, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    cmd = [
        sys.executable, "igpt/train.py", f"+stage={stage}", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY,
        "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.max_steps=3", "trainer.eval_every=3",
        "trainer.eval_batches=1", "trainer.ckpt_every=3", "trainer.progress=false", "trainer.sample_every_eval=false",
        "logger.wandb.mode=disabled", "optim.lr=3e-3", "optim.warmup_steps=1", f"kernels.attention={attention}",
        f"kernels.loss={loss}", "kernels.strict=true",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"kernels: attention={attention} loss={loss}" in proc.stderr
    return {**read_metrics(run_dir), **{-s: r for s, r in read_metrics(run_dir, "val").items()}}


def test_triton_kernels_train_like_sdpa(prepared_text_dir, tmp_path):
    ref = _train(prepared_text_dir, str(tmp_path / "sdpa"), "sdpa", "torch")
    tri = _train(prepared_text_dir, str(tmp_path / "triton"), "triton", "triton")
    assert sorted(ref) == sorted(tri) == [-3, 1, 2, 3]
    for step in (1, 2, 3):
        assert tri[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4, abs=1e-4), step
        assert tri[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-3), step
    assert tri[-3]["loss"] == pytest.approx(ref[-3]["loss"], rel=1e-4)
    assert tri[-3]["bpb"] == pytest.approx(ref[-3]["bpb"], rel=1e-4)


def test_dpo_log_probs_from_the_fused_kernel(prepared_pref_dir, tmp_path):
    """DPO's per-token log-probs through the fused linear cross-entropy kernel (no (N, V) logits) train like torch's."""
    ref = _train(prepared_pref_dir, str(tmp_path / "torch"), "sdpa", "torch", stage="dpo")
    tri = _train(prepared_pref_dir, str(tmp_path / "triton"), "sdpa", "triton", stage="dpo")
    for step in (1, 2, 3):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert tri[step][key] == pytest.approx(ref[step][key], rel=1e-4, abs=1e-4), (step, key)
    assert tri[-3]["kl"] == pytest.approx(ref[-3]["kl"], rel=1e-4, abs=1e-6)
