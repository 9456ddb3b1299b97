"""More cases for ``bench/trust_replay.py``: bad inputs, faults and rank failures a careless or hostile user meets.

Each ``input_*``, ``fault_*`` or ``rank_*`` function takes the replay's context and fixtures and returns
``{"outcome": ...}`` as the replay classifies it. Faults are injected from outside igpt (a ``sitecustomize`` the
harness writes, patching torch or the file system), so the same case runs against any checkout, old or new.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from bench.trust_replay import TINY, WORDS, Ctx, _bad_config, _prepare, _trained, flip, outcome


# ---------------------------------------------------------------------------------------------------- helpers
def _hook_env(c: Ctx, name: str, code: str) -> dict[str, str]:
    """``c.env`` with a ``sitecustomize`` holding ``code`` first on PYTHONPATH (a harness-side fault)."""
    d = c.path(f"hook-{name}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "sitecustomize.py"), "w") as f:
        f.write(code)
    return {**c.env, "PYTHONPATH": f"{d}:{c.env['PYTHONPATH']}"}


def _train_args(c: Ctx, data: str, run: str, *extra: str, batch: int = 4) -> list[str]:
    return [c.py, "igpt/train.py", "+stage=pretrain", f"data.dir={data}", f"run_dir={run}", *TINY,
            f"trainer.global_batch_size={batch}", "trainer.micro_batch_size=4", "trainer.eval_every=0",
            "trainer.progress=false", "trainer.sample_every_eval=false", "logger.wandb.mode=disabled",
            "optim.warmup_steps=1", "trainer.eval_batches=1", *extra]


def _log(run: str) -> str:
    path = os.path.join(run, "logs", "rank0.log")
    return open(path).read() if os.path.exists(path) else ""


def _steps(run: str) -> list[int]:
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("split") == "train":
            out.append(rec["step"])
    return out


def _recovered(c: Ctx, fx, run: str, want_resume_step: int, total: int) -> dict:
    """Resume ``run`` to ``total`` steps: named when it resumed from ``want_resume_step`` (the newest intact
    checkpoint) and reached the end; silent when it restarted or went on from a broken checkpoint."""
    proc = c.train(fx["text"], run, f"trainer.max_steps={total}", "trainer.ckpt_every=2")
    log = _log(run)
    if proc.returncode:
        return {"outcome": outcome(proc, ["checkpoint"]), "rc": proc.returncode}
    ok = f"step_{want_resume_step:07d}" in log and "resumed from" in log and max(_steps(run), default=0) == total
    return {"outcome": "named" if ok else "silent", "rc": proc.returncode}


def _jsonl(c: Ctx, name: str, lines: list[str], encoding: str = "utf-8") -> str:
    path = c.path(name)
    with open(path, "w", encoding=encoding, errors="surrogateescape") as f:
        f.writelines(line + "\n" for line in lines)
    return path


def _prep(c: Ctx, fx, src: str, kind: str, names: list[str], *extra: str) -> dict:
    out = c.path(f"prep-{os.path.basename(src)}-{kind}")
    proc = _prepare(c, fx, f"input={src}", f"output_dir={out}", f"kind={kind}", *extra)
    return {"outcome": outcome(proc, names), "rc": proc.returncode}


def _good_sft(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"Say {WORDS[i % len(WORDS)]}."},
                                    {"role": "assistant", "content": f"{WORDS[i % len(WORDS)]}."}]})


# ---------------------------------------------------------------------------------------------------- bad inputs
def input_unknown_key(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-typo", "+trainer.max_stepz=3", ["max_stepz"])


def input_wrong_type(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-type", "trainer.eval_every=often", ["trainer.eval_every"])


def input_unknown_strategy(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-strat", "strategy=fsdp3", ["fsdp3"])


def input_unknown_attention(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-attn", "kernels.attention=fast", ["kernels.attention"])


def input_unknown_precision(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-prec", "precision=fp8", ["precision"])


def input_seq_len_over_model(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-seq", "trainer.seq_len=128", ["trainer.seq_len"])


def input_batch_not_divisible(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-gbs", "trainer.global_batch_size=6", ["trainer.global_batch_size"])


def input_negative_lr(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-lr", "optim.lr=-0.001", ["optim.lr"])


def input_negative_max_steps(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-steps", "trainer.max_steps=-5", ["trainer.max_steps"])


def input_heads_do_not_divide_dim(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-heads", "model.dim=66", ["dim"])


def input_init_from_missing(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-init", f"init_from={c.path('no-such-run')}", ["init_from"])


def input_init_from_a_data_dir(c: Ctx, fx) -> dict:
    return _bad_config(c, fx, "r-initdata", f"init_from={fx['text']}", ["init_from"])


def input_data_dir_is_a_file(c: Ctx, fx) -> dict:
    proc = c.train(fx["tok"], c.path("r-datafile"), "trainer.max_steps=1")
    return {"outcome": outcome(proc, ["data.dir"]), "rc": proc.returncode}


def input_stage_reads_other_kind(c: Ctx, fx) -> dict:
    proc = c.run("igpt/train.py", "+stage=sft", f"data.dir={fx['text']}", f"run_dir={c.path('r-kind')}", *TINY,
                 "trainer.max_steps=1", "logger.wandb.mode=disabled")
    return {"outcome": outcome(proc, ["kind"]), "rc": proc.returncode}


def input_prepare_missing_input(c: Ctx, fx) -> dict:
    return _prep(c, fx, c.path("no-such-file.txt"), "text", ["no-such-file.txt"])


def input_prepare_empty_file(c: Ctx, fx) -> dict:
    return _prep(c, fx, _jsonl(c, "empty.txt", []), "text", ["empty.txt"])


def input_prepare_malformed_jsonl_line(c: Ctx, fx) -> dict:
    src = _jsonl(c, "broken.jsonl", [_good_sft(0), '{"messages": [{"role": "user", "content": "hi"}', _good_sft(2)])
    return _prep(c, fx, src, "sft", ["broken.jsonl", "2"])


def input_prepare_wrong_field(c: Ctx, fx) -> dict:
    src = _jsonl(c, "nochosen.jsonl", [json.dumps({"prompt": "Hi?", "winner": "Hello.", "rejected": "No."})])
    return _prep(c, fx, src, "pref", ["nochosen.jsonl", "chosen"])


def input_prepare_not_utf8(c: Ctx, fx) -> dict:
    path = c.path("latin1.txt")
    with open(path, "wb") as f:
        f.write("caf\u00e9 na\u00efve ".encode("latin-1") * 50)
    return _prep(c, fx, path, "text", ["latin1.txt"])


def input_prepare_kwise_one_response(c: Ctx, fx) -> dict:
    src = _jsonl(c, "onerank.jsonl", [json.dumps({"prompt": "Hi?", "responses": ["Hello."], "ranking": [0]})])
    return _prep(c, fx, src, "pref", ["onerank.jsonl"])


def input_prepare_kto_label_not_bool(c: Ctx, fx) -> dict:
    src = _jsonl(c, "kto.jsonl", [json.dumps({"prompt": "Hi?", "completion": "Hello.", "label": "yes"})])
    return _prep(c, fx, src, "kto", ["kto.jsonl", "label"])


def input_prepare_missing_tokenizer(c: Ctx, fx) -> dict:
    out = c.path("prep-notok")
    proc = c.run("-m", "igpt.data.prepare", f"input={fx['txt']}/d0.txt", f"output_dir={out}",
                 f"tokenizer={c.path('no-tok.json')}")
    return {"outcome": outcome(proc, ["no-tok.json"]), "rc": proc.returncode}


def input_prepare_bad_val_fraction(c: Ctx, fx) -> dict:
    out = c.path("prep-val")
    proc = c.run("-m", "igpt.data.prepare", f"input={fx['txt']}/d0.txt", f"output_dir={out}",
                 f"tokenizer={fx['tok']}", "val_fraction=1.5")
    return {"outcome": outcome(proc, ["val_fraction"]), "rc": proc.returncode}


def input_generate_missing_checkpoint(c: Ctx, fx) -> dict:
    proc = c.run("-m", "igpt.generate", f"checkpoint={c.path('no-run')}", "prompt=hi")
    return {"outcome": outcome(proc, ["no-run"]), "rc": proc.returncode}


def input_export_from_a_data_dir(c: Ctx, fx) -> dict:
    proc = c.run("-m", "igpt.export", f"checkpoint={fx['text']}", f"output={c.path('exp-data')}")
    return {"outcome": outcome(proc, [fx["text"]]), "rc": proc.returncode}


def input_crafted_train_state(c: Ctx, fx) -> dict:
    """A downloaded run dir whose train_state.pt is a crafted pickle, meta.json's sizes and checksums made to match."""
    import pickle

    from bench.trust_replay import Payload

    run = _trained(c, fx, "i-crafted", steps=2)
    ck = os.path.join(run, "checkpoints", "step_0000002")
    marker = c.path("pwned-train-state")
    with open(os.path.join(ck, "train_state.pt"), "wb") as f:
        pickle.dump(Payload(marker), f)
    meta = json.load(open(os.path.join(ck, "meta.json")))
    if "files" in meta:
        meta["files"]["train_state.pt"] = os.path.getsize(os.path.join(ck, "train_state.pt"))
    if meta.get("checksums"):
        sys.path.insert(0, c.repo)
        from igpt.checksum import file_checksum

        meta["checksums"]["train_state.pt"] = file_checksum(os.path.join(ck, "train_state.pt"))
    with open(os.path.join(ck, "meta.json"), "w") as f:
        json.dump(meta, f)
    proc = c.train(fx["text"], run, "trainer.max_steps=3")
    if os.path.exists(marker):
        return {"outcome": "code ran", "rc": proc.returncode}
    return {"outcome": outcome(proc, ["train_state.pt"]), "rc": proc.returncode}


# ---------------------------------------------------------------------------------------------------- faults
def fault_kill_inside_checkpoint_write(c: Ctx, fx) -> dict:
    """SIGKILL while checkpoint 4 is half written (train_state.pt's write held open): resume from checkpoint 2."""
    run = c.path("f-killwrite")
    code = ("import torch, time, os\n_save = torch.save\n"
            "def save(obj, f, *a, **k):\n"
            "    _save(obj, f, *a, **k)\n"
            "    if str(f).endswith('train_state.pt') and 'step_0000004' in str(f):\n"
            "        open(os.environ['HOLD_MARK'], 'w').close(); time.sleep(600)\n"
            "torch.save = save\n")
    env = {**_hook_env(c, "killwrite", code), "HOLD_MARK": c.path("held")}
    proc = subprocess.Popen(_train_args(c, fx["text"], run, "trainer.max_steps=6", "trainer.ckpt_every=2"),
                            cwd=c.repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not os.path.exists(c.path("held")):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    return _recovered(c, fx, run, 2, 6)


def fault_kill_after_a_checkpoint(c: Ctx, fx) -> dict:
    run = c.path("f-killafter")
    proc = subprocess.Popen(_train_args(c, fx["text"], run, "trainer.max_steps=100000", "trainer.ckpt_every=2"),
                            cwd=c.repo, env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(run, "checkpoints", "latest")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(latest) and "step_0000004" in open(latest).read()):
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    return _recovered(c, fx, run, 4, max(_steps(run), default=4) + 2)


def _signal_stop(c: Ctx, fx, name: str, how: str) -> dict:
    run = c.path(name)
    proc = subprocess.Popen(_train_args(c, fx["text"], run, "trainer.max_steps=100000", "trainer.ckpt_every=0"),
                            cwd=c.repo, env=c.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not _steps(run):
        time.sleep(0.2)
    if how == "STOP":
        open(os.path.join(run, "STOP"), "w").close()
    else:
        proc.send_signal(getattr(signal, how))
    rc = proc.wait(timeout=180)
    stopped = max(_steps(run), default=0)
    ok = rc == 0 and os.path.exists(os.path.join(run, "preempted"))
    if not ok:
        return {"outcome": "silent", "rc": rc}
    res = _recovered(c, fx, run, stopped, stopped + 2)
    return {**res, "stopped_at": stopped}


def fault_sigusr1(c: Ctx, fx) -> dict:
    return _signal_stop(c, fx, "f-usr1", "SIGUSR1")


def fault_stop_file(c: Ctx, fx) -> dict:
    return _signal_stop(c, fx, "f-stop", "STOP")


def fault_stale_lock(c: Ctx, fx) -> dict:
    run = c.path("f-stale")
    os.makedirs(run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    with open(os.path.join(run, "run.lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": dead.pid, "start": 1.7e9, "slurm_job_id": None}, f)
    proc = c.train(fx["text"], run, "trainer.max_steps=1")
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return {"outcome": "named" if "stale" in out else "silent", "rc": 0}
    return {"outcome": outcome(proc, ["run.lock"]), "rc": proc.returncode}


def fault_nan_every_step(c: Ctx, fx) -> dict:
    """Every loss is NaN (a diverged run): the run stops after trainer.max_bad_steps with a line saying so."""
    code = ("import torch\n_ce = torch.nn.functional.cross_entropy\n"
            "def ce(*a, **k):\n    return _ce(*a, **k) * float('nan')\n"
            "torch.nn.functional.cross_entropy = ce\n")
    env = _hook_env(c, "nan", code)
    proc = subprocess.run(_train_args(c, fx["text"], c.path("f-nan"), "trainer.max_steps=20",
                                      "trainer.max_bad_steps=3", "kernels.loss=torch"),
                          cwd=c.repo, env=env, capture_output=True, text=True, timeout=300)
    return {"outcome": outcome(proc, ["non-finite"]), "rc": proc.returncode}


def fault_missing_shard(c: Ctx, fx) -> dict:
    data = c.path("data-noshard")
    shutil.copytree(fx["text"], data)
    os.remove(os.path.join(data, "train", "shard-000000.tar"))
    proc = c.train(data, c.path("f-noshard"), "trainer.max_steps=2")
    return {"outcome": outcome(proc, ["shard-000000.tar"]), "rc": proc.returncode}


def fault_flipped_val_shard(c: Ctx, fx) -> dict:
    data = c.path("data-badval")
    shutil.copytree(fx["text"], data)
    shard = os.path.join(data, "val", "shard-000000.tar")
    flip(shard, at=1024, n=8)
    proc = c.train(data, c.path("f-badval"), "trainer.max_steps=2", "trainer.eval_every=1")
    return {"outcome": outcome(proc, ["shard-000000.tar"]), "rc": proc.returncode}


def _break_newest(c: Ctx, fx, name: str, how) -> dict:
    run = _trained(c, fx, name)  # checkpoints at steps 2 and 4
    how(os.path.join(run, "checkpoints", "step_0000004"), run)
    return _recovered(c, fx, run, 2, 5)


def fault_flipped_train_state(c: Ctx, fx) -> dict:
    return _break_newest(c, fx, "f-flipstate", lambda ck, run: flip(os.path.join(ck, "train_state.pt")))


def fault_flipped_checkpoint_tokenizer(c: Ctx, fx) -> dict:
    return _break_newest(c, fx, "f-fliptok", lambda ck, run: flip(os.path.join(ck, "tokenizer.json"), n=16))


def fault_truncated_weights(c: Ctx, fx) -> dict:
    def cut(ck, run):
        path = os.path.join(ck, "model.safetensors")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    return _break_newest(c, fx, "f-truncw", cut)


def fault_deleted_newest_checkpoint(c: Ctx, fx) -> dict:
    return _break_newest(c, fx, "f-delck", lambda ck, run: shutil.rmtree(ck))


def fault_corrupt_meta_json(c: Ctx, fx) -> dict:
    def corrupt(ck, run):
        with open(os.path.join(ck, "meta.json"), "w") as f:
            f.write('{"format": 1, "step": ')

    return _break_newest(c, fx, "f-meta", corrupt)


def fault_garbage_latest(c: Ctx, fx) -> dict:
    def garbage(ck, run):
        with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
            f.write("../../../etc\n")

    run = _trained(c, fx, "f-latest")
    garbage(None, run)
    return _recovered(c, fx, run, 4, 5)


def fault_full_disk_during_prepare(c: Ctx, fx) -> dict:
    out = c.path("prep-full")
    os.makedirs(out)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {out}"],
                           capture_output=True)
    if probe.returncode:
        return {"outcome": "skipped", "rc": None}
    big = c.path("big.txt")
    with open(big, "w") as f:
        for i in range(20000):
            f.write(" ".join(WORDS) + f" {i}\n")
    target = os.path.join(out, "data")
    script = (f"mount -t tmpfs -o size=1m none {out} && {c.py} -m igpt.data.prepare input={big} "
              f"output_dir={target} tokenizer={fx['tok']} val_fraction=0; echo rc=$?; ls -a {out}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=c.repo, env=c.env, capture_output=True,
                          text=True)
    rc = int(proc.stdout.split("rc=")[1].split()[0]) if "rc=" in proc.stdout else -1
    left = ".tmp-" in proc.stdout
    res = outcome(subprocess.CompletedProcess([], rc, "", proc.stderr), ["no space left"])
    return {"outcome": "data loss" if left and res == "named" else res, "rc": rc, "temp_left": left}


def fault_overwrite_prepared_dataset(c: Ctx, fx) -> dict:
    """overwrite=true on a prepared dataset replaces it, and the old one stays whole until the new one is in place."""
    out = c.path("prep-again")
    first = _prepare(c, fx, f"input={fx['txt']}/d0.txt", f"output_dir={out}")
    again = _prepare(c, fx, f"input={fx['txt']}/d1.txt", f"output_dir={out}")
    third = _prepare(c, fx, f"input={fx['txt']}/d1.txt", f"output_dir={out}", "overwrite=true")
    ok = first.returncode == 0 and again.returncode != 0 and third.returncode == 0 and \
        os.path.exists(os.path.join(out, "index.json"))
    return {"outcome": outcome(again, ["overwrite"]) if ok else "silent", "rc": again.returncode}


def fault_deleted_index_json(c: Ctx, fx) -> dict:
    run = _trained(c, fx, "f-noindex", steps=2)
    data = c.path("data-noindex")
    shutil.copytree(fx["text"], data)
    os.remove(os.path.join(data, "index.json"))
    proc = c.train(data, run, "trainer.max_steps=3")
    return {"outcome": outcome(proc, ["index.json"]), "rc": proc.returncode}


def fault_missing_weights_file(c: Ctx, fx) -> dict:
    return _break_newest(c, fx, "f-noweights", lambda ck, run: os.remove(os.path.join(ck, "model.safetensors")))


def fault_missing_data_tokenizer(c: Ctx, fx) -> dict:
    data = c.path("data-notok")
    shutil.copytree(fx["text"], data)
    os.remove(os.path.join(data, "tokenizer.json"))
    proc = c.train(data, c.path("f-notok"), "trainer.max_steps=1")
    return {"outcome": outcome(proc, ["tokenizer.json"]), "rc": proc.returncode}


# ---------------------------------------------------------------------------------------------------- ranks
def _two_ranks(c: Ctx, fx, name: str, code: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**_hook_env(c, name, code), "OMP_NUM_THREADS": "1"}
    args = _train_args(c, fx["text"], c.path(name), "trainer.max_steps=8", "trainer.ckpt_every=0", "strategy=ddp",
                       "strategy.timeout_s=30", *extra, batch=8)
    cmd = [c.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args[1:]]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=c.repo, env=env, capture_output=True, text=True, timeout=400)
    return proc, time.time() - t0


_RANK1_AT_STEP3 = ("import os, torch\n_step = torch.optim.AdamW.step\nn = [0]\n"
                   "def step(self, *a, **k):\n    n[0] += 1\n"
                   "    if os.environ.get('RANK') == '1' and n[0] == 3:\n        ACTION\n"
                   "    return _step(self, *a, **k)\ntorch.optim.AdamW.step = step\n")


def rank_killed(c: Ctx, fx) -> dict:
    code = _RANK1_AT_STEP3.replace("ACTION", "import signal; os.kill(os.getpid(), signal.SIGKILL)")
    proc, took = _two_ranks(c, fx, "k-killed", code)
    ok = proc.returncode != 0 and "SIGKILL" in proc.stdout + proc.stderr
    return {"outcome": "named" if ok else ("silent" if proc.returncode == 0 else "traceback"), "rc": proc.returncode,
            "s_to_end": round(took, 1)}


def rank_frozen(c: Ctx, fx) -> dict:
    code = _RANK1_AT_STEP3.replace("ACTION", "import time; time.sleep(3600)")
    proc, took = _two_ranks(c, fx, "k-frozen", code)
    out = proc.stdout + proc.stderr
    ok = proc.returncode != 0 and ("timed out" in out.lower() or "timeout" in out.lower())
    return {"outcome": "named" if ok else ("silent" if proc.returncode == 0 else "traceback"), "rc": proc.returncode,
            "s_to_end": round(took, 1)}


def rank_raises(c: Ctx, fx) -> dict:
    code = _RANK1_AT_STEP3.replace("ACTION", "raise RuntimeError('rank 1 broke: the root cause')")
    proc, took = _two_ranks(c, fx, "k-raises", code)
    ok = proc.returncode != 0 and "rank 1 broke: the root cause" in proc.stdout + proc.stderr
    return {"outcome": "named" if ok else ("silent" if proc.returncode == 0 else "traceback"), "rc": proc.returncode,
            "s_to_end": round(took, 1)}


KINDS = {"input_": "input", "fault_": "fault", "rank_": "rank"}
CASES = {name: fn for name, fn in dict(globals()).items() if name.startswith(tuple(KINDS)) and callable(fn)}
