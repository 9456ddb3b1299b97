"""Replay a careless or hostile user's bad inputs and faults against a checkout of igpt and count the outcomes.

    python bench/trust_replay.py [--repo /path/to/igpt/checkout] [--only name,...] [--json out.json]

Every case runs igpt's own command lines (train, prepare, generate, export) in a subprocess with ``PYTHONPATH`` set
to ``--repo`` (default: this checkout), on a tiny model and a small prepared dataset built once with this checkout's
``prepare`` (older checkouts read its index.json too), and is classified as:

- ``named``: the run refused (or, for a recoverable fault, warned and recovered) with a message naming the bad
  key, file, shard, checkpoint or run, and no traceback;
- ``traceback``: a Python traceback reached the user;
- ``silent``: the bad input was accepted (exit 0) without a word;
- ``data loss``: a file the user had (or a previous checkpoint) is gone;
- ``code ran``: a crafted checkpoint executed code (counted as its own outcome; also ``silent`` if the run went on).

The cases are grouped: 38 bad inputs, 28 faults and 3 rank failures (this file's 22, and bench/trust_cases.py,
whose faults are injected from outside igpt: a ``sitecustomize`` patching torch, a tmpfs, signals); the summary
counts each group. Not part of the test suite (about 6-10 minutes on 2 idle cores per checkout). Run it on the old
and the new code to get the before/after table:

    git worktree add /tmp/igpt-old <old commit> && python bench/trust_replay.py --repo /tmp/igpt-old
    python bench/trust_replay.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
        "model.vocab_size=384", "model.max_seq_len=64", "trainer.seq_len=64"]
WORDS = "the king queen lord lady knight sword crown castle night day love death war peace heart soul".split()


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Ctx:
    def __init__(self, repo: str, tmp: str) -> None:
        self.repo, self.tmp = repo, tmp
        self.py = sys.executable
        self.env = {**os.environ, "PYTHONPATH": repo, "WANDB_MODE": "disabled"}

    def run(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run([self.py, *args], cwd=self.repo, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def train(self, data: str, run_dir: str, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return self.run("igpt/train.py", "+stage=pretrain", f"data.dir={data}", f"run_dir={run_dir}", *TINY,
                        "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.eval_every=0",
                        "trainer.ckpt_every=2", "trainer.progress=false", "trainer.sample_every_eval=false",
                        "logger.wandb.mode=disabled", "optim.warmup_steps=1", "trainer.eval_batches=1", *extra,
                        timeout=timeout)

    def path(self, *parts: str) -> str:
        return os.path.join(self.tmp, *parts)


def outcome(proc: subprocess.CompletedProcess, names: list[str], warned: bool = False) -> str:
    """named / traceback / silent from a finished command: ``names`` must all appear in its output."""
    out = proc.stdout + proc.stderr
    if "Traceback (most recent call last)" in out:
        return "traceback"
    if proc.returncode != 0 or warned:
        return "named" if all(n in out for n in names) else "traceback"
    return "silent"


def flip(path: str, at: int | None = None, n: int = 64) -> None:
    size = os.path.getsize(path)
    at = size // 2 if at is None else at
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(n)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


# ---------------------------------------------------------------------------------------------------- fixtures
def build_fixtures(tmp: str) -> dict[str, str]:
    """A tokenizer, a text dataset, a pref dataset source, with this checkout's CLIs (shared by every case)."""
    env = {**os.environ, "PYTHONPATH": HERE}
    rng = random.Random(0)
    txt = os.path.join(tmp, "txt")
    os.makedirs(txt)
    for i in range(30):
        with open(os.path.join(txt, f"d{i}.txt"), "w") as f:
            f.write(" ".join(rng.choice(WORDS) for _ in range(400)) + "\n")
    tok = os.path.join(tmp, "tok.json")
    subprocess.run([sys.executable, "-m", "igpt.data.tokenizer", f"input={txt}/*.txt", "vocab_size=384",
                    f"output={tok}"], cwd=HERE, env=env, check=True, capture_output=True)
    text = os.path.join(tmp, "text")
    subprocess.run([sys.executable, "-m", "igpt.data.prepare", f"input={txt}/*.txt", f"output_dir={text}",
                    f"tokenizer={tok}", "kind=text", "val_fraction=0.1", "shard_tokens=3000"], cwd=HERE, env=env,
                   check=True, capture_output=True)
    return {"tok": tok, "text": text, "txt": txt}


# ---------------------------------------------------------------------------------------------------- cases
def case_malicious_generate(c: Ctx, fx) -> dict:
    return _malicious(c, fx, "generate")


def case_malicious_export(c: Ctx, fx) -> dict:
    return _malicious(c, fx, "export")


def case_malicious_init_from(c: Ctx, fx) -> dict:
    return _malicious(c, fx, "init_from")


def _malicious(c: Ctx, fx, how: str) -> dict:
    import torch
    import torch.distributed.checkpoint as dcp

    from igpt.config import ModelConfig
    from igpt.model import Transformer

    ckpt = c.path(f"evil-{how}")
    cfg = dict(name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=384, max_seq_len=64)
    model = Transformer(ModelConfig(**cfg))
    dcp.save({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint_id=os.path.join(ckpt, "model"),
             no_dist=True)
    marker = c.path(f"pwned-{how}")
    with open(os.path.join(ckpt, "model", ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)
    shutil.copyfile(fx["tok"], os.path.join(ckpt, "tokenizer.json"))
    files = {os.path.relpath(os.path.join(r, n), ckpt): os.path.getsize(os.path.join(r, n))
             for r, _, ns in os.walk(ckpt) for n in ns}
    with open(os.path.join(ckpt, "meta.json"), "w") as f:
        json.dump({"format": 1, "step": 1, "stage": "pretrain", "model": cfg, "strategy": "fsdp",
                   "tokenizer": "tokenizer.json", "models": {"policy": {"dir": ".", "head": "lm"}}, "files": files}, f)
    del torch
    if how == "generate":
        proc = c.run("-m", "igpt.generate", f"checkpoint={ckpt}", "prompt=the king", "max_new_tokens=2")
    elif how == "export":
        proc = c.run("-m", "igpt.export", f"checkpoint={ckpt}", f"output={c.path('exported')}")
    else:
        proc = c.train(fx["text"], c.path("run-evil"), "trainer.max_steps=1", f"init_from={ckpt}")
    ran = os.path.exists(marker)
    res = "code ran" if ran else outcome(proc, [".metadata"])
    return {"outcome": res, "rc": proc.returncode}


def _trained(c: Ctx, fx, name: str, steps: int = 4) -> str:
    run = c.path(name)
    proc = c.train(fx["text"], run, f"trainer.max_steps={steps}")
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return run


def _resume_after_flip(c: Ctx, fx, name: str, file: str) -> dict:
    run = _trained(c, fx, name)
    bad = os.path.join(run, "checkpoints", "step_0000004", file)
    flip(bad)
    proc = c.train(fx["text"], run, "trainer.max_steps=5")
    log = open(os.path.join(run, "logs", "rank0.log")).read()
    warned = file in log and ("corrupt" in log or "checksum" in log)
    return {"outcome": outcome(proc, [file], warned=warned), "rc": proc.returncode}


def case_flipped_weights(c: Ctx, fx) -> dict:
    return _resume_after_flip(c, fx, "flip-w", "model.safetensors")


def case_flipped_optimizer(c: Ctx, fx) -> dict:
    return _resume_after_flip(c, fx, "flip-o", "optimizer.pt")


def case_flipped_shard(c: Ctx, fx) -> dict:
    data = c.path("data-flipped")
    shutil.copytree(fx["text"], data)
    from igpt.data.partition import _scan_tar

    shard = os.path.join(data, "train", "shard-000000.tar")
    with open(shard, "rb") as f:
        _, off, size = _scan_tar(f.read(), "x")[0]
    flip(shard, at=off, n=min(8, size))
    proc = c.train(data, c.path("run-flipped-shard"), "trainer.max_steps=2")
    return {"outcome": outcome(proc, ["shard-000000.tar"]), "rc": proc.returncode}


def case_truncated_shard(c: Ctx, fx) -> dict:
    data = c.path("data-truncated")
    shutil.copytree(fx["text"], data)
    shard = os.path.join(data, "train", "shard-000000.tar")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    proc = c.train(data, c.path("run-trunc-shard"), "trainer.max_steps=2")
    return {"outcome": outcome(proc, ["shard-000000.tar"]), "rc": proc.returncode}


def case_two_runs_one_run_dir(c: Ctx, fx) -> dict:
    run = c.path("shared")
    args = [sys.executable, "igpt/train.py", "+stage=pretrain", f"data.dir={fx['text']}", f"run_dir={run}", *TINY,
            "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.eval_every=0",
            "trainer.ckpt_every=0", "trainer.progress=false", "trainer.sample_every_eval=false",
            "logger.wandb.mode=disabled", "trainer.max_steps=100000"]
    first = subprocess.Popen(args, cwd=c.repo, env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        time.sleep(0.2)
    second = c.train(fx["text"], run, "trainer.max_steps=3")
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    return {"outcome": outcome(second, ["run.lock"]) if second.returncode else "silent", "rc": second.returncode}


def _prepare(c: Ctx, fx, *args: str) -> subprocess.CompletedProcess:
    return c.run("-m", "igpt.data.prepare", f"tokenizer={fx['tok']}", "val_fraction=0", *args)


def case_overwrite_user_folder(c: Ctx, fx) -> dict:
    home = c.path("home")
    os.makedirs(home)
    with open(os.path.join(home, "thesis.tex"), "w") as f:
        f.write("years of work")
    proc = _prepare(c, fx, f"input={fx['txt']}/d0.txt", f"output_dir={home}", "overwrite=true")
    if not os.path.exists(os.path.join(home, "thesis.tex")):
        return {"outcome": "data loss", "rc": proc.returncode}
    return {"outcome": outcome(proc, [home]), "rc": proc.returncode}


def case_overwrite_own_input(c: Ctx, fx) -> dict:
    src = c.path("inputs")
    shutil.copytree(fx["txt"], src)
    proc = _prepare(c, fx, f"input={src}/*.txt", f"output_dir={src}", "overwrite=true")
    if not os.path.exists(os.path.join(src, "d0.txt")):
        return {"outcome": "data loss", "rc": proc.returncode}
    return {"outcome": outcome(proc, [src]), "rc": proc.returncode}


def case_resume_other_model(c: Ctx, fx) -> dict:
    run = _trained(c, fx, "other-model", steps=2)
    proc = c.train(fx["text"], run, "trainer.max_steps=3", "model.ffn_dim=192")
    return {"outcome": outcome(proc, ["ffn_dim"]), "rc": proc.returncode}


def case_resume_other_tokenizer(c: Ctx, fx) -> dict:
    run = _trained(c, fx, "other-tok", steps=2)
    data = _other_tokenizer_data(c, fx)
    proc = c.train(data, run, "trainer.max_steps=3")
    return {"outcome": outcome(proc, ["tokenizer"]), "rc": proc.returncode}


def _other_tokenizer_data(c: Ctx, fx) -> str:
    data = c.path("data-other-tok")
    if not os.path.exists(data):
        shutil.copytree(fx["text"], data)
        path = os.path.join(data, "tokenizer.json")
        tok = json.load(open(path))
        vocab = tok["model"]["vocab"]
        a, b = sorted(vocab, key=vocab.get)[100:102]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        json.dump(tok, open(path, "w"))
    return data


def case_init_from_other_tokenizer(c: Ctx, fx) -> dict:
    src = _trained(c, fx, "tok-src", steps=2)
    proc = c.train(_other_tokenizer_data(c, fx), c.path("tok-new"), "trainer.max_steps=1", f"init_from={src}")
    return {"outcome": outcome(proc, ["tokenizer"]), "rc": proc.returncode}


def _pref(c: Ctx, fx, name: str, recs: list[dict]) -> dict:
    src = c.path(f"{name}.jsonl")
    good = [{"prompt": f"Name the {w}.", "chosen": f"The {w}.", "rejected": "No."} for w in WORDS]
    with open(src, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in good + recs)
    proc = _prepare(c, fx, f"input={src}", f"output_dir={c.path(name)}", "kind=pref")
    if proc.returncode:
        return {"outcome": outcome(proc, [src]), "rc": proc.returncode}
    index = json.load(open(os.path.join(c.path(name), "index.json")))
    kept = index["splits"]["train"]["samples"]
    counted = "dropped" in proc.stdout + proc.stderr
    return {"outcome": "named" if kept == len(good) and counted else "silent", "rc": proc.returncode}


def case_pref_identical(c: Ctx, fx) -> dict:
    return _pref(c, fx, "pref-same", [{"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}])


def case_pref_empty_prompt(c: Ctx, fx) -> dict:
    return _pref(c, fx, "pref-empty", [{"prompt": "", "chosen": "A.", "rejected": "B."}])


def _bad_config(c: Ctx, fx, name: str, override: str, names: list[str]) -> dict:
    proc = c.train(fx["text"], c.path(name), "trainer.max_steps=1", override)
    return {"outcome": outcome(proc, names), "rc": proc.returncode}


def case_data_dir_missing(c: Ctx, fx) -> dict:
    proc = c.train(c.path("nowhere"), c.path("r-nodata"), "trainer.max_steps=1")
    return {"outcome": outcome(proc, ["data.dir"]), "rc": proc.returncode}


def case_n_kv_heads_zero(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-kv0", "model.n_kv_heads=0", ["n_kv_heads"])


def case_micro_batch_zero(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-mb0", "trainer.micro_batch_size=0", ["micro_batch_size"])


def case_cuda_without_cuda(c: Ctx, fx) -> dict:
    import torch

    if torch.cuda.is_available():
        return {"outcome": "skipped", "rc": None}
    return _bad_config(c, fx, "r-cuda", "device=cuda", ["device=cuda"])


def case_invalid_index_json(c: Ctx, fx) -> dict:
    data = c.path("data-badindex")
    shutil.copytree(fx["text"], data)
    with open(os.path.join(data, "index.json"), "w") as f:
        f.write('{"version": 1, "kind": "text",')
    proc = c.train(data, c.path("r-badindex"), "trainer.max_steps=1")
    return {"outcome": outcome(proc, ["index.json"]), "rc": proc.returncode}


def case_full_disk(c: Ctx, fx) -> dict:
    run = c.path("r-full")
    os.makedirs(run)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {run}"],
                           capture_output=True)
    if probe.returncode:
        return {"outcome": "skipped", "rc": None}
    args = " ".join(["igpt/train.py", "+stage=pretrain", f"data.dir={fx['text']}", f"run_dir={run}", *TINY,
                     "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.eval_every=0",
                     "trainer.progress=false", "trainer.sample_every_eval=false", "logger.wandb.mode=disabled",
                     "trainer.max_steps=2"])
    script = f"mount -t tmpfs -o size=1m none {run} && {c.py} {args}; echo rc=$?; ls -a {run}/checkpoints"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=c.repo, env=c.env, capture_output=True,
                          text=True)
    rc = int(proc.stdout.split("rc=")[1].split()[0]) if "rc=" in proc.stdout else -1
    left = ".tmp-step" in proc.stdout
    res = outcome(subprocess.CompletedProcess([], rc, "", proc.stderr), ["no space left on"])
    return {"outcome": res, "rc": rc, "temp_left": left}


def case_sigterm_exit(c: Ctx, fx) -> dict:
    run = c.path("r-term")
    args = [c.py, "igpt/train.py", "+stage=pretrain", f"data.dir={fx['text']}", f"run_dir={run}", *TINY,
            "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "trainer.eval_every=0",
            "trainer.ckpt_every=0", "trainer.progress=false", "trainer.sample_every_eval=false",
            "logger.wandb.mode=disabled", "trainer.max_steps=100000"]
    proc = subprocess.Popen(args, cwd=c.repo, env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    took = time.time() - t0
    ok = rc == 0 and os.path.exists(os.path.join(run, "preempted")) and took <= 10
    return {"outcome": "named" if ok else "silent", "rc": rc, "exit_s": round(took, 1)}


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}
#: the group of each case above; bench/trust_cases.py adds more of each and the rank failures
FAULTS = {"flipped_weights", "flipped_optimizer", "flipped_shard", "truncated_shard", "two_runs_one_run_dir",
          "overwrite_user_folder", "overwrite_own_input", "full_disk", "sigterm_exit"}


def all_cases() -> dict[str, tuple[str, object]]:
    """name -> (group, case): this file's 22 (13 bad inputs, 9 faults) and bench/trust_cases.py's."""
    from bench import trust_cases

    out = {name: ("fault" if name in FAULTS else "input", fn) for name, fn in CASES.items()}
    for name, fn in trust_cases.CASES.items():
        prefix = next(p for p in trust_cases.KINDS if name.startswith(p))
        out[name[len(prefix):]] = (trust_cases.KINDS[prefix], fn)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default=HERE)
    ap.add_argument("--only", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s]
    results = {}
    with tempfile.TemporaryDirectory(prefix="igpt-replay-") as tmp:
        fx = build_fixtures(tmp)
        c = Ctx(os.path.abspath(args.repo), tmp)
        for name, (group, fn) in all_cases().items():
            if only and name not in only:
                continue
            t0 = time.time()
            try:
                res = fn(c, fx)
            except Exception as e:  # the harness itself failed for this case
                res = {"outcome": "harness error", "error": repr(e)[:300]}
            res["s"] = round(time.time() - t0, 1)
            res["group"] = group
            results[name] = res
            extra = {k: v for k, v in res.items() if k not in ("outcome", "group")}
            print(f"{group:5s} {name:36s} {res['outcome']:10s} {json.dumps(extra)}", flush=True)
    counts = collections.Counter(r["outcome"] for r in results.values())
    for group in ("input", "fault", "rank"):
        n = collections.Counter(r["outcome"] for r in results.values() if r["group"] == group)
        print(f"{group}: {sum(n.values())} cases, " + ", ".join(f"{k}: {v}" for k, v in sorted(n.items())))
    print("all: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"repo": args.repo, "results": results, "counts": counts}, f, indent=2)


if __name__ == "__main__":
    main()
