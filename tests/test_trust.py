"""Trust what you load and what you resume: safe DCP loading, checksums, run locks, refused mismatches, one-line
errors. Unit-sized: small files, a tiny model, at most a few training steps."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil

import pytest
import torch

from igpt import checkpoint
from igpt.config import ModelConfig
from igpt.errors import CheckpointError

TINY_CFG = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, max_seq_len=16)


class _Payload:
    """Unpickling this runs ``touch <marker>`` (what a crafted checkpoint does)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _dcp_checkpoint(folder: str, malicious_marker: str | None = None, tokenizer: str | None = None) -> str:
    """An igpt checkpoint dir written as FSDP writes one (model/ through torch.distributed.checkpoint); with
    ``malicious_marker``, ``model/.metadata`` is replaced by a pickle whose unpickling creates that file."""
    import torch.distributed.checkpoint as dcp

    from igpt.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY_CFG))
    state = checkpoint.savable_state(model, model.state_dict())
    dcp.save(state, checkpoint_id=os.path.join(folder, "model"), no_dist=True)
    if malicious_marker is not None:
        with open(os.path.join(folder, "model", ".metadata"), "wb") as f:
            pickle.dump(_Payload(malicious_marker), f)
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(folder, "tokenizer.json"))
    meta = {"format": 1, "step": 1, "stage": "pretrain", "model": {"name": "tiny", **TINY_CFG},
            "strategy": "fsdp", "models": {"policy": {"dir": ".", "head": "lm"}},
            "files": checkpoint._file_sizes(folder)}
    with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return folder


def test_genuine_dcp_checkpoint_loads_through_the_safe_reader(tmp_path, tokenizer_file):
    ckpt = _dcp_checkpoint(str(tmp_path / "ok"), tokenizer=tokenizer_file)
    model, _, meta = checkpoint.load_model(ckpt)
    assert meta["stage"] == "pretrain" and model.embed_tokens.weight.shape == (64, 32)


@pytest.mark.parametrize("path", ["load_model", "read_model_state", "init_from", "resume"])
def test_malicious_dcp_metadata_is_refused_and_runs_nothing(tmp_path, tokenizer_file, path):
    """Failure 1: a crafted ``model/.metadata`` ran a shell command under generate/export/init_from (fails on the
    old code: the marker file is created)."""
    marker = str(tmp_path / "pwned")
    ckpt = _dcp_checkpoint(str(tmp_path / "evil"), malicious_marker=marker, tokenizer=tokenizer_file)
    with pytest.raises(CheckpointError, match=r"refused to load.*posix\.system|refused to load.*os\.system"):
        if path == "load_model":  # igpt.generate, igpt.export, igpt.chat, lm_eval
            checkpoint.load_model(ckpt)
        elif path == "read_model_state":
            checkpoint.read_model_state(ckpt)
        elif path == "init_from":  # the trainer's init_from / reference_from / reward.model
            from igpt.model import Transformer

            source = checkpoint.open_source(ckpt, "init_from")
            source.load_into(Transformer(ModelConfig(**TINY_CFG)))
        else:  # strategy=fsdp's resume reads model/ and optim/ with these
            from igpt.safe_load import dcp_load

            dcp_load({"x": torch.empty(1)}, os.path.join(ckpt, "model"), no_dist=True)
    assert not os.path.exists(marker), "the checkpoint's pickle ran code"


def test_non_tensor_dcp_entries_are_read_weights_only(tmp_path):
    """DCP's default planner reads non-tensor entries (an optimizer's param_groups) with weights_only=False."""
    import torch.distributed.checkpoint as dcp

    from igpt.safe_load import dcp_load

    marker = str(tmp_path / "pwned")
    folder = str(tmp_path / "optim")
    dcp.save({"groups": _Payload(marker)}, checkpoint_id=folder, no_dist=True)
    state = {"groups": None}
    with pytest.raises(CheckpointError, match="'groups': it is not plain data"):
        dcp_load(state, folder, no_dist=True)
    assert not os.path.exists(marker)
    dcp.save({"groups": (0.1, (0.9, 0.95), "w")}, checkpoint_id=folder + "2", no_dist=True)
    state = {"groups": None}
    dcp_load(state, folder + "2", no_dist=True)
    assert state["groups"] == (0.1, (0.9, 0.95), "w")  # plain data still loads


def test_legacy_deepspeed_checkpoint_is_refused_not_unpickled(tmp_path):
    """Failure 1: the legacy ZeRO resume path (DeepSpeed's per-rank files) unpickled with weights_only=False (fails
    on the old code: it calls engine.load_checkpoint)."""
    from types import SimpleNamespace

    pytest.importorskip("deepspeed")
    from igpt.parallel.zero import DS_DIR, ZeroWrapped

    os.makedirs(tmp_path / DS_DIR / "state")
    called = []
    fake = SimpleNamespace(name="policy", strategy=SimpleNamespace(name="zero2", world_size=1),
                           engine=SimpleNamespace(load_checkpoint=lambda *a, **k: called.append(a) or (None, None)))
    with pytest.raises(CheckpointError, match="DeepSpeed's own per-rank files.*init_from="):
        ZeroWrapped.load(fake, str(tmp_path), {"strategy": "zero2", "world_size": 1})
    assert not called


# ---------------------------------------------------------------------------------------------------- checksums
def _base(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    from tests.conftest import TINY

    return ["+stage=pretrain", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, "trainer.global_batch_size=4",
            "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.ckpt_every=2", "trainer.progress=false",
            "trainer.sample_every_eval=false", "logger.wandb.mode=disabled", "optim.warmup_steps=1",
            "trainer.eval_batches=1", *extra]


def _flip(path: str, at: int | None = None, n: int = 64) -> None:
    """Flip ``n`` bytes in the middle of a file (its size unchanged)."""
    size = os.path.getsize(path)
    at = size // 2 if at is None else at
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(n)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


def test_checksum_mismatch_falls_back_to_the_newest_intact_checkpoint(prepared_text_dir, tmp_path):
    """Failure 2: 64 flipped bytes in model.safetensors (same size) were resumed silently (fails on the old code: it
    resumes from step 4 and warns about nothing)."""
    from tests.trainutil import train, train_steps

    run = str(tmp_path / "run")
    train(_base(prepared_text_dir, run, "trainer.max_steps=4"))
    meta = checkpoint.read_meta(os.path.join(run, "checkpoints", "step_0000004"))
    assert meta["checksum"] == "xxh3_64" and set(meta["checksums"]) == set(meta["files"])
    bad = os.path.join(run, "checkpoints", "step_0000004", "model.safetensors")
    _flip(bad)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):  # generate/export/init_from refuse it
        checkpoint.open_source(os.path.join(run, "checkpoints", "step_0000004"))
    os.remove(os.path.join(run, "logs", "rank0.log"))
    train(_base(prepared_text_dir, run, "trainer.max_steps=5"))
    log = open(os.path.join(run, "logs", "rank0.log")).read()
    assert f"{bad} is corrupt: its xxh3_64 checksum" in log, log
    assert "step_0000002, the newest complete checkpoint" in log, log
    assert train_steps(run) == [1, 2, 3, 4, 3, 4, 5]


def test_checkpoints_without_checksums_still_load(tmp_path, tokenizer_file):
    ckpt = _dcp_checkpoint(str(tmp_path / "old"), tokenizer=tokenizer_file)  # meta.json has sizes only
    assert "checksums" not in checkpoint.read_meta(ckpt)
    assert checkpoint.is_complete(ckpt, verify=True) == (True, "")
    checkpoint.load_model(ckpt)


def test_shard_checksum_is_verified_once(prepared_text_dir, tmp_path):
    """Failure 2 (data): flipped bits in a shard's payload trained silently (fails on the old code: no error)."""
    from igpt.data import partition
    from igpt.data.partition import CorruptShardError, Shard, read_index

    data = str(tmp_path / "data")
    shutil.copytree(prepared_text_dir, data)
    idx = read_index(data, "train")
    info = idx.shards[0]
    assert info.checksum and len(info.checksum) == 16
    Shard(info, idx.kind, idx.dtype, idx.vocab_size)  # intact
    assert any(k[0] == info.path for k in partition._VERIFIED)
    with open(info.path, "rb") as f:
        _, off, size = partition._scan_tar(f.read(), info.name)[0]
    _flip(info.path, at=off, n=min(8, size))  # inside a sample's ids: the tar headers stay valid
    os.utime(info.path, ns=(0, 0))  # a new mtime: verified again
    with pytest.raises(CorruptShardError, match=r"shard train/shard-000000.tar is corrupt: its xxh3_64"):
        Shard(info, idx.kind, idx.dtype, idx.vocab_size)
    Shard(dataclasses.replace(info, checksum=None), idx.kind, idx.dtype, idx.vocab_size)  # data.verify=false
    # data prepared before checksums: no "xxh3_64" in index.json, read as before
    with open(os.path.join(data, "index.json")) as f:
        index = json.load(f)
    for split in index["splits"].values():
        for s in split["shards"]:
            s.pop("xxh3_64")
    with open(os.path.join(data, "index.json"), "w") as f:
        json.dump(index, f)
    assert read_index(data, "train").shards[0].checksum is None


# ---------------------------------------------------------------------------------------------------- run lock
def _lock(run_dir: str, **holder) -> None:
    import socket

    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run.lock"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getppid(), "start": 1.7e9, "slurm_job_id": None, **holder},
                  f)


def test_second_run_on_a_run_dir_fails_at_once_naming_the_holder(prepared_text_dir, tmp_path):
    """Failure 3: two runs sharing a run_dir both ran (fails on the old code: the trainer starts)."""
    from igpt.errors import ConfigError
    from tests.trainutil import make_trainer

    run = str(tmp_path / "run")
    _lock(run)  # held by a live process (our parent) on this host
    with pytest.raises(ConfigError, match=rf"run_dir={run} is in use by another run: pid {os.getppid()} on host "):
        make_trainer(_base(prepared_text_dir, run, "trainer.max_steps=1"))
    assert not os.path.exists(os.path.join(run, "checkpoints"))


def test_a_refused_run_writes_nothing_into_the_holders_run_dir(prepared_text_dir, tmp_path):
    """The second run is refused before it writes anything: not a line appended to the holder's logs, not its
    overrides.yaml replaced (the old code opened logs/rank0.log and wrote overrides.yaml before taking the lock)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    run = tmp_path / "run"
    _lock(str(run))
    (run / "logs").mkdir()
    (run / "logs" / "rank0.log").write_text("the holder's log\n")
    (run / "overrides.yaml").write_text("- the holder's overrides\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    proc = subprocess.run([sys.executable, "igpt/train.py", *_base(prepared_text_dir, str(run), "trainer.max_steps=1")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO, "WANDB_MODE": "disabled"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is in use by another run" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "logs" / "rank0.log").read_text() == "the holder's log\n"
    assert (run / "overrides.yaml").read_text() == "- the holder's overrides\n"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_stale_locks_are_taken_over_and_released(tmp_path, monkeypatch, caplog):
    import subprocess
    import sys

    from igpt.errors import ConfigError
    from igpt.runlock import RunLock

    run = str(tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(run, pid=dead.pid)  # same host, process gone
    lock = RunLock(run)
    lock.acquire()
    assert f"taking over the stale lock {run}/run.lock of pid {dead.pid}" in caplog.text
    assert json.load(open(os.path.join(run, "run.lock")))["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(os.path.join(run, "run.lock"))
    # a requeued Slurm job: same job id, another node (its pid cannot be checked there)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _lock(run, host="node-that-died", pid=1, slurm_job_id="4242")
    lock = RunLock(run)
    lock.acquire()
    assert "the same Slurm job 4242 (requeued)" in caplog.text
    lock.release()
    # another job's lock on another host: taken only when squeue says that job ended
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    _lock(run, host="other-node", pid=1, slurm_job_id="17")
    squeue.write_text("#!/bin/sh\necho RUNNING\n")
    squeue.chmod(0o755)
    with pytest.raises(ConfigError, match="pid 1 on host other-node .*Slurm job 17"):
        RunLock(run).acquire()
    squeue.write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    RunLock(run).acquire()
    assert "its Slurm job 17 is no longer running" in caplog.text


# ---------------------------------------------------------------------------------------------------- mismatches
def _other_tokenizer_data(src: str, dst: str) -> str:
    """A copy of prepared data whose tokenizer maps two vocabulary entries the other way round (another tokenizer,
    the same vocabulary size)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "tokenizer.json")
    with open(path) as f:
        tok = json.load(f)
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(path, "w") as f:
        json.dump(tok, f)
    return dst


def test_resume_refuses_another_model_stage_or_tokenizer(prepared_text_dir, prepared_sft_dir, tmp_path):
    """Failure 5: resume silently continued the old model after a changed model.* (fails on the old code: the
    trainer is built with the checkpoint's model and no error)."""
    from tests.trainutil import make_trainer, train

    run = str(tmp_path / "run")
    train(_base(prepared_text_dir, run, "trainer.max_steps=2"))
    with pytest.raises(CheckpointError, match=r"another model architecture: model.ffn_dim=128 in the checkpoint, "
                                              r"192 in this run's config"):
        make_trainer(_base(prepared_text_dir, run, "trainer.max_steps=4", "model.ffn_dim=192"))
    with pytest.raises(CheckpointError, match=r"written by stage=pretrain, this run is stage=sft"):
        make_trainer(["+stage=sft", *_base(prepared_sft_dir, run, "trainer.max_steps=4")[1:]])
    other = _other_tokenizer_data(prepared_text_dir, str(tmp_path / "other"))
    with pytest.raises(CheckpointError, match=r"another tokenizer than data.dir=.*: tokenizer fingerprint"):
        make_trainer(_base(other, run, "trainer.max_steps=4"))
    trainer = make_trainer(_base(prepared_text_dir, run, "trainer.max_steps=4"))  # the same config resumes
    assert trainer.step == 2
    trainer.close()
    fp = checkpoint.read_meta(os.path.join(run, "checkpoints", "step_0000002"))["tokenizer_fingerprint"]
    assert fp == json.load(open(os.path.join(prepared_text_dir, "index.json")))["tokenizer"]["fingerprint"]


def test_init_from_with_another_tokenizer_fails_unless_allowed(prepared_text_dir, tmp_path):
    """Failure 5: init_from with data of another tokenizer trained without a word (fails on the old code)."""
    from tests.trainutil import make_trainer, train

    src = str(tmp_path / "src")
    train(_base(prepared_text_dir, src, "trainer.max_steps=1"))
    other = _other_tokenizer_data(prepared_text_dir, str(tmp_path / "other"))
    args = _base(other, str(tmp_path / "new"), "trainer.max_steps=1", f"init_from={src}")
    with pytest.raises(CheckpointError, match=r"init_from=.*another tokenizer than the data.*tokenizer_mismatch=allow"):
        make_trainer(args)
    make_trainer([*args, "tokenizer_mismatch=allow"]).close()


def test_prepare_drops_identical_pairs_and_empty_prompts(tokenizer_file, tmp_path):
    """Failure 5: chosen == rejected pairs trained at ln 2 and empty prompts were written as data (fails on the old
    code: every record is kept and there is no "filtered" count)."""
    from igpt.data.prepare import prepare

    src = tmp_path / "pairs.jsonl"
    recs = [{"prompt": f"Name the {w}.", "chosen": f"The {w}.", "rejected": "No."} for w in ("king", "queen", "day")]
    recs += [{"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}, {"prompt": "  ", "chosen": "A.",
                                                                         "rejected": "B."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.warns(UserWarning, match="dropped 1 record.*empty prompt and 1 preference record"):
        index = prepare(str(src), str(tmp_path / "out"), tokenizer_file, kind="pref", val_fraction=0.0,
                        num_workers=0, progress=False)
    assert index["filtered"] == {"empty_prompt": 1, "identical_responses": 1}
    assert index["splits"]["train"]["samples"] == 3


def test_prepare_overwrite_replaces_only_a_prepared_dataset(prepared_text_dir, tokenizer_file, tmp_path):
    """Failure 4: overwrite=true deleted whatever folder it was given (fails on the old code: the folder and the
    file in it are gone)."""
    from igpt.data.prepare import prepare
    from igpt.errors import ConfigError

    src = tmp_path / "in" / "doc.txt"
    src.parent.mkdir()
    src.write_text("the king and the queen. " * 50)
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    kw = dict(val_fraction=0.0, num_workers=0, progress=False, overwrite=True)
    with pytest.raises(ConfigError, match="not a prepared dataset .no index.json. and not empty.*nothing was deleted"):
        prepare(str(src), str(precious), tokenizer_file, **kw)
    assert (precious / "thesis.tex").read_text() == "years of work"
    with pytest.raises(ConfigError, match="holds the input"):
        prepare(str(src), str(src.parent), tokenizer_file, **kw)
    assert src.exists()
    (tmp_path / "empty").mkdir()
    prepare(str(src), str(tmp_path / "empty"), tokenizer_file, **kw)  # an empty folder
    prepare(str(src), str(tmp_path / "empty"), tokenizer_file, **kw)  # a prepared dataset
    assert os.path.exists(tmp_path / "empty" / "index.json")


# ---------------------------------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("override, match", [
    ("model.n_kv_heads=0", "'model.n_kv_heads' is 0; expected a positive integer"),
    ("trainer.micro_batch_size=0", "'trainer.micro_batch_size' is 0; expected a positive integer"),
])
def test_zero_sizes_are_config_errors(override, match):
    """Failure 6: ZeroDivisionError tracebacks (fails on the old code: ZeroDivisionError, or no error at all)."""
    from igpt.config import validate
    from igpt.errors import ConfigError
    from tests.trainutil import compose_config

    with pytest.raises(ConfigError, match=match):
        validate(compose_config(["+stage=pretrain", "data.dir=x", override]))


def test_data_and_device_problems_are_typed_errors(prepared_text_dir, tmp_path):
    """Failure 6: data.dir missing, an invalid index.json and device=cuda without CUDA were tracebacks (fails on the
    old code: FileNotFoundError / JSONDecodeError / RuntimeError, none of them an IgptError)."""
    from igpt.data.partition import CorruptShardError
    from igpt.errors import ConfigError, DataError, IgptError, MissingPathError
    from tests.trainutil import make_trainer

    assert issubclass(CorruptShardError, IgptError)
    with pytest.raises(MissingPathError, match=r"data.dir=.*nowhere: no such directory"):
        make_trainer(_base(str(tmp_path / "nowhere"), str(tmp_path / "r1")))
    bad = str(tmp_path / "bad")
    shutil.copytree(prepared_text_dir, bad)
    with open(os.path.join(bad, "index.json"), "w") as f:
        f.write('{"version": 1, "kind": "text",')  # cut short
    with pytest.raises(DataError, match=rf"{bad}/index.json: not valid JSON"):
        make_trainer(_base(bad, str(tmp_path / "r2")))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda but CUDA is not available"):
            make_trainer(_base(prepared_text_dir, str(tmp_path / "r3"), "device=cuda"))


def test_train_cli_prints_one_line_for_a_user_error(tmp_path):
    """Failure 6 at the command line (fails on the old code: a FileNotFoundError traceback)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "igpt/train.py", "+stage=pretrain", f"data.dir={tmp_path}/none",
                           f"run_dir={tmp_path}/run", "logger.wandb.mode=disabled"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"data.dir={tmp_path}/none: no such directory" in errors[0], proc.stderr


def _can_mount_tmpfs(where: str) -> bool:
    import subprocess

    os.makedirs(where, exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {where}"],
                           capture_output=True)
    return probe.returncode == 0


def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temp_files(prepared_text_dir, tmp_path):
    """Failure 6: a full disk said 'unexpected pos 1716352 vs 1716244' and left the temp folder (fails on the old
    code: a traceback and .tmp-step_0000002 left). A real full filesystem: a 1 MiB tmpfs in a mount namespace."""
    import subprocess
    import sys

    from tests.conftest import REPO

    run = str(tmp_path / "run")
    if not _can_mount_tmpfs(run):
        pytest.skip("cannot mount a tmpfs in a user/mount namespace here (unshare -rm)")
    args = " ".join(_base(prepared_text_dir, run, "trainer.max_steps=2"))
    script = (f"mount -t tmpfs -o size=1m none {run} && cd {REPO} && {sys.executable} igpt/train.py {args}; "
              f"echo rc=$?; ls -a {run}/checkpoints")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert "rc=2" in proc.stdout, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"no space left on {run}/checkpoints" in proc.stderr, proc.stderr
    assert ".tmp-step" not in proc.stdout, proc.stdout  # the partial checkpoint was removed


def test_full_disk_during_prepare_is_one_line_and_leaves_no_temp_files(tokenizer_file, tmp_path):
    """The replay's full disk during prepare: an OSError traceback before; one line naming the folder now, and the
    partial output removed. A real full filesystem: a 1 MiB tmpfs in a mount namespace."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = str(tmp_path / "full")
    if not _can_mount_tmpfs(out):
        pytest.skip("cannot mount a tmpfs in a user/mount namespace here (unshare -rm)")
    big = tmp_path / "big.txt"
    big.write_text("".join(f"the king and the queen rode out at night, {i}\n" for i in range(20000)))
    script = (f"mount -t tmpfs -o size=1m none {out} && cd {REPO} && {sys.executable} -m igpt.data.prepare "
              f"input={big} output_dir={out}/data tokenizer={tokenizer_file} val_fraction=0; echo rc=$?; ls -a {out}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert "rc=0" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no space left on {out} while preparing {out}/data" in proc.stderr, proc.stderr[-3000:]
    assert ".data.tmp-" not in proc.stdout, proc.stdout  # the partial output was removed


@pytest.mark.parametrize("override,match", [("optim.lr=-0.001", "'optim.lr' is -0.001"),
                                            ("optim.beta2=1.0", "'optim.beta2' is 1.0"),
                                            ("optim.warmup_steps=-1", "'optim.warmup_steps' is -1")])
def test_out_of_range_optimiser_values_are_config_errors(override, match):
    """The replay's negative learning rate ended in AdamW's 'Invalid learning rate: -0.001', naming no key."""
    from igpt.config import validate
    from igpt.errors import ConfigError
    from tests.trainutil import compose_config

    with pytest.raises(ConfigError, match=match):
        validate(compose_config(["+stage=pretrain", "data.dir=x", override]))


def test_a_diverged_run_and_a_data_dir_without_tokenizer_are_typed_errors(prepared_text_dir, tmp_path):
    """Both were tracebacks in the replay: max_bad_steps raised a bare FloatingPointError, a data dir without its
    tokenizer.json a FileNotFoundError. Both are igpt errors now (one line from every CLI)."""
    from types import SimpleNamespace

    from igpt.errors import DivergedError, IgptError, MissingPathError
    from igpt.stages.context import StepResult
    from igpt.trainer import Trainer

    stub = SimpleNamespace(cfg=SimpleNamespace(trainer=SimpleNamespace(max_bad_steps=2)), skipped_steps=0, step=7)
    bad = StepResult(loss=float("nan"), lr=1e-3, grad_norm=float("nan"), finite=False)
    assert Trainer._check_finite(stub, bad, 0) == 1
    with pytest.raises(DivergedError, match="2 consecutive non-finite losses, the last at step 7") as e:
        Trainer._check_finite(stub, bad, 1)
    assert isinstance(e.value, IgptError) and isinstance(e.value, FloatingPointError)
    data = tmp_path / "data"
    shutil.copytree(prepared_text_dir, data)
    os.remove(data / "tokenizer.json")
    from igpt.stages.context import RunData

    with pytest.raises(MissingPathError, match=rf"{data}/tokenizer.json' does not exist"):
        RunData.open(str(data), "text", "pretrain", torch.device("cpu"))


def test_sigterm_exits_promptly_after_the_checkpoint(prepared_text_dir, tmp_path):
    """Failure 6: a SIGTERM'd run once took 42 s to exit after its checkpoint; here it must exit 0 within 10 s of the
    signal with the checkpoint and ``preempted`` written. (The 42 s case did not reproduce on a tiny model, so this
    passes on the old code too: it guards the bound.)"""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    run = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "igpt/train.py", *_base(prepared_text_dir, run, "trainer.max_steps=100000",
                                                                     "trainer.ckpt_every=0")],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    took = time.time() - t0
    assert rc == 0 and os.path.exists(os.path.join(run, "preempted")), rc
    assert checkpoint.find_latest(run) is not None
    assert took <= 10, f"exited {took:.1f}s after SIGTERM"


# ---------------------------------------------------------------------------------------------------- crafted pickles
def _reseal(ckpt_dir: str) -> None:
    """Make meta.json's sizes and checksums match the files again (a hostile checkpoint is self-consistent)."""
    from igpt.checksum import file_checksum

    meta = checkpoint.read_meta(ckpt_dir)
    meta["files"] = {rel: os.path.getsize(os.path.join(ckpt_dir, rel)) for rel in meta["files"]}
    meta["checksums"] = {rel: file_checksum(os.path.join(ckpt_dir, rel)) for rel in meta["checksums"]}
    with open(os.path.join(ckpt_dir, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f)


def test_crafted_optimizer_and_train_state_pickles_are_refused_naming_the_file(prepared_text_dir, tmp_path):
    """A resumed run dir whose optimizer.pt or train_state.pt is a crafted pickle (meta.json made to match): refused
    as a CheckpointError naming the file, nothing run (before: torch's UnpicklingError traceback)."""
    from tests.trainutil import make_trainer, train

    run = str(tmp_path / "run")
    train(_base(prepared_text_dir, run, "trainer.max_steps=2"))
    step2 = os.path.join(run, "checkpoints", "step_0000002")
    marker = str(tmp_path / "pwned")
    for name in ("optimizer.pt", "train_state.pt"):
        good = open(os.path.join(step2, name), "rb").read()
        with open(os.path.join(step2, name), "wb") as f:
            pickle.dump(_Payload(marker), f)
        _reseal(step2)
        with pytest.raises(CheckpointError, match=rf"{step2}/{name}: refused to load: it is not plain tensor data"):
            make_trainer(_base(prepared_text_dir, run, "trainer.max_steps=3"))
        assert not os.path.exists(marker), "the checkpoint's pickle ran code"
        with open(os.path.join(step2, name), "wb") as f:
            f.write(good)
        _reseal(step2)
