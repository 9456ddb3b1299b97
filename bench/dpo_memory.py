"""Peak memory of DPO with a live reference against ``dpo.precompute_reference=true``, measured in the same run.

    python bench/dpo_memory.py [--dim 768] [--layers 12] [--steps 3]

Makes a small synthetic preference dataset and tokenizer in a temporary folder, then trains the same DPO job twice
in fresh processes (``igpt/train.py``, one process each, fp32 on the CPU): with the reference in memory, and with
its log-probs precomputed. For each run it prints

- the peak resident set of the process (``peak_mem_gb`` of the run's last metrics record: ``ru_maxrss``), minus the
  peak of an idle process that imports torch and igpt (the runtime itself), and
- the model-parameter bytes the trainer holds while it trains (every model in ``trainer.models``), counted in the
  training process itself after the last step.

The ratio precompute / live of both is the result: parameters 0.5 (one model instead of two); the peak a bit above
the parameter share because gradients, AdamW's two moments and activations belong to the policy alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN = r"""
import json, sys
sys.argv = sys.argv[:1]
from hydra import compose, initialize_config_dir
from igpt.config import register, validate
from igpt.train import CONF_DIR, setup_logging
from igpt.trainer import Trainer
register()
with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
    cfg = validate(compose("config", overrides=json.loads(OVERRIDES)))
setup_logging(cfg.run_dir)
trainer = Trainer(cfg)
trainer.fit()
held = sum(p.numel() * p.element_size() for h in trainer.models.values() for p in h.module.parameters())
print("HELD", held, sorted(trainer.models))
trainer.close()
"""


def run_python(code: str) -> tuple[str, int]:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--records", type=int, default=64)
    args = p.parse_args()

    from igpt.data.prefs import synthetic
    from igpt.data.prepare import prepare
    from igpt.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        synthetic(os.path.join(tmp, "p.jsonl"), n=args.records, seed=0)
        with open(os.path.join(tmp, "text.txt"), "w", encoding="utf-8") as f:
            f.write(open(os.path.join(tmp, "p.jsonl"), encoding="utf-8").read())
        train_tokenizer(os.path.join(tmp, "text.txt"), 512, os.path.join(tmp, "tok.json"), progress=False)
        prepare(os.path.join(tmp, "p.jsonl"), os.path.join(tmp, "data"), os.path.join(tmp, "tok.json"), kind="pref",
                val_fraction=0.1, num_workers=1, progress=False)
        heads = max(1, args.dim // 64)
        common = [
            "+stage=dpo", f"data.dir={tmp}/data", f"model.dim={args.dim}", f"model.n_layers={args.layers}",
            f"model.n_heads={heads}", f"model.n_kv_heads={heads}", f"model.ffn_dim={4 * args.dim}",
            "model.vocab_size=512", "model.max_seq_len=128", "trainer.seq_len=128", "trainer.global_batch_size=4",
            "trainer.micro_batch_size=4", f"trainer.max_steps={args.steps}", "trainer.eval_every=0",
            "trainer.ckpt_every=0", "trainer.progress=false", "trainer.sample_every_eval=false",
            "logger.wandb.mode=disabled", "data.num_partitions=4",
        ]
        _, idle_kib = run_python("import torch, igpt.trainer, igpt.stages.dpo")
        rows = {}
        for mode in ("live", "precompute"):
            run_dir = os.path.join(tmp, mode)
            overrides = [*common, f"run_dir={run_dir}", f"dpo.precompute_reference={str(mode == 'precompute').lower()}"]
            out, _ = run_python(f"OVERRIDES = {json.dumps(json.dumps(overrides))}\n" + TRAIN)
            held = int(next(line.split()[1] for line in out.splitlines() if line.startswith("HELD")))
            with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
                peak_gb = [r for r in map(json.loads, f) if r["split"] == "train"][-1]["peak_mem_gb"]
            rows[mode] = {"held": held, "peak": peak_gb * 2**30 - idle_kib * 1024}
    n_params = rows["precompute"]["held"] // 4
    print(f"DPO, {n_params / 1e6:.1f}M-parameter model (dim {args.dim}, {args.layers} layers), fp32, CPU, "
          f"{args.steps} steps; idle process {idle_kib / 2**20:.2f} GiB (subtracted)")
    print(f"{'reference':<11} {'params held MiB':>16} {'peak above idle MiB':>20}")
    for mode, r in rows.items():
        print(f"{mode:<11} {r['held'] / 2**20:>16.1f} {r['peak'] / 2**20:>20.1f}")
    live, pre = rows["live"], rows["precompute"]
    print(f"precompute / live: parameters held {pre['held'] / live['held']:.2f}, peak {pre['peak'] / live['peak']:.2f}")


if __name__ == "__main__":
    main()
