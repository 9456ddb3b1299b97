"""The installed environment as a user meets it: no repository folder shadows an installed package, from any entry
point; the base install (no extras) runs the main commands; a feature that needs an extra names it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, TINY

# what `pip install igpt` (no extras) lacks: the dev, eval, data and demo extras' top-level modules
EXTRAS = ["transformers", "sklearn", "lm_eval", "datasets", "pyarrow", "psutil", "chatterbot_corpus", "accelerate",
          "optuna", "peft", "pytest"]  # fmt: skip

PROBE = """
def _igpt_probe():
    import json, os, sys
    out = {"path0": os.path.abspath(sys.path[0] or "."), "rank": os.environ.get("RANK")}
    try:
        import kernels
        out["kernels"] = getattr(kernels, "__file__", None) or list(getattr(kernels, "__path__", []))
    except ImportError as e:
        out["kernels"] = f"ImportError: {e}"
    if os.environ.get("PROBE_TRANSFORMERS"):
        try:
            from transformers import LlamaForCausalLM  # noqa: F401
            out["transformers"] = "ok"
        except Exception as e:
            out["transformers"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(os.environ["PROBE_OUT"], f"{os.getpid()}.json"), "w") as f:
        json.dump(out, f)
"""


def _site(tmp_path, probe: bool = False, block: list[str] = ()) -> dict[str, str]:
    """An environment whose ``sitecustomize`` runs the import probe at exit (``probe``: after the entry point set
    its ``sys.path`` up) and/or makes the modules ``block`` uninstalled."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    code = "import atexit, sys\n"
    if block:
        # every finder answers "not there" for the blocked names, for imports and importlib.util.find_spec alike
        code += textwrap.dedent(f"""
            class _Hide:
                BLOCKED = {list(block)!r}
                def __init__(self, inner):
                    self.inner = inner
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in self.BLOCKED:
                        return None
                    return self.inner.find_spec(name, path, target)
                def __getattr__(self, attr):
                    return getattr(self.inner, attr)
            sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
        """)
    if probe:
        code += PROBE + "atexit.register(_igpt_probe)\n"
    (site / "sitecustomize.py").write_text(code)
    out = tmp_path / "probe"
    out.mkdir(exist_ok=True)
    # this checkout's igpt (not whichever one the editable install points at), for runs from another directory
    path = os.pathsep.join([str(site), REPO, *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "PROBE_OUT": str(out), "WANDB_MODE": "disabled"}


def _probes(tmp_path) -> list[dict]:
    found = []
    for name in sorted(os.listdir(tmp_path / "probe")):
        with open(tmp_path / "probe" / name) as f:
            found.append(json.load(f))
        os.remove(tmp_path / "probe" / name)
    return found


def _installed_kernels() -> str:
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package 'kernels' is not installed (transformers >= 5 brings it)")
    return os.path.dirname(str(dist.locate_file("kernels/__init__.py")))


@pytest.mark.integration
def test_import_kernels_finds_the_installed_package_from_the_repo_root(tmp_path):
    """From the repository root, `import kernels` is the PyPI package (transformers imports it), never igpt's
    top-level kernels/ folder: in pytest itself, python -c, python -m, python igpt/train.py and torchrun."""
    site_kernels = _installed_kernels()
    import kernels

    assert os.path.dirname(kernels.__file__) == site_kernels  # this pytest process (the repo root is on sys.path)
    from transformers import LlamaForCausalLM  # noqa: F401

    import igpt.kernels

    assert callable(igpt.kernels.flash_attn_func) and igpt.kernels.__name__ == "igpt.kernels"

    env = {**_site(tmp_path, probe=True), "PROBE_TRANSFORMERS": "1"}
    for cmd in ([sys.executable, "-c", "pass"], [sys.executable, "-m", "tests.rewards"]):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (probe,) = _probes(tmp_path)
        assert probe["kernels"] == os.path.join(site_kernels, "__init__.py"), (cmd, probe)
        assert probe["transformers"] == "ok", (cmd, probe)
    # the training entry point, alone and under torchrun: its own folder (igpt/, which holds igpt.kernels and a module
    # named lm_eval) must not be sys.path[0]; the working directory is, as with python -m
    env.pop("PROBE_TRANSFORMERS")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for cmd in ([sys.executable, "igpt/train.py", "+stage=pretrain", "--cfg", "job"],
                [torchrun, "--standalone", "--nproc_per_node=1", "igpt/train.py", "+stage=pretrain", "--cfg", "job"]):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        probes = [p for p in _probes(tmp_path) if cmd[0] == sys.executable or p["rank"] is not None]
        assert probes, cmd
        for probe in probes:
            assert probe["kernels"] == os.path.join(site_kernels, "__init__.py"), (cmd, probe)
            assert probe["path0"] == REPO, (cmd, probe)


@pytest.mark.integration
def test_no_folder_that_can_start_sys_path_shadows_an_installed_package():
    """Every folder that becomes sys.path[0] (the repository root for python -c/-m and pytest, bench/ and tests/ for
    their scripts, slurm/, conf/) holds no module or regular package named like an installed distribution's
    top-level module. igpt/ is the exception that train.py takes off sys.path (tested above)."""
    installed = set(importlib.metadata.packages_distributions())
    clashes = []
    for folder in ("", "bench", "tests", "slurm", "conf", "kernels"):
        root = os.path.join(REPO, folder)
        for name in os.listdir(root):
            path = os.path.join(root, name)
            module = name[:-3] if name.endswith(".py") else name
            importable = name.endswith(".py") or os.path.isfile(os.path.join(path, "__init__.py"))
            if importable and module in installed and not (folder == "" and module == "igpt"):
                clashes.append(f"{folder or '.'}/{name} shadows the installed {module!r}")
    assert not clashes, clashes
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py"))  # kernels/ must stay a plain folder


@pytest.mark.integration
def test_base_install_runs_the_main_commands_and_extras_are_named(tmp_path, tokenizer_file):
    """Without any extra (transformers, scikit-learn, lm_eval, datasets, pyarrow, ... made uninstalled): prepare,
    pretrain, generate and export work, and a feature that needs an extra says which, in one line."""
    env = _site(tmp_path, block=EXTRAS)
    docs = tmp_path / "txt"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(("the king and the queen speak of war and peace. " * 40) + f"{i}\n")

    def run(*args, ok=True):
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert (proc.returncode == 0) == ok, (args, proc.stdout[-2000:], proc.stderr[-3000:])
        return proc

    data = tmp_path / "data"
    run("-m", "igpt.data.prepare", f"input={docs}/*.txt", f"output_dir={data}", f"tokenizer={tokenizer_file}",
        "kind=text", "val_fraction=0.2")  # fmt: skip
    run(os.path.join(REPO, "igpt", "train.py"), "+stage=pretrain", *TINY, f"data.dir={data}",
        f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2", "trainer.global_batch_size=2",
        "trainer.micro_batch_size=2", "trainer.seq_len=32", "trainer.eval_every=2", "trainer.ckpt_every=2",
        "trainer.eval_batches=1", "trainer.sample_every_eval=false", "trainer.progress=false")  # fmt: skip
    out = run("-m", "igpt.generate", f"checkpoint={tmp_path / 'run'}", "prompt=the king", "max_new_tokens=4")
    assert out.stdout.strip()
    run("-m", "igpt.export", f"checkpoint={tmp_path / 'run'}", f"output={tmp_path / 'hf'}")
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "model.safetensors").exists()

    # features of the extras: one line naming the extra, no traceback
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    err = run("-m", "igpt.data.prepare", f"input={tmp_path / 't.parquet'}", f"output_dir={tmp_path / 'p'}",
              f"tokenizer={tokenizer_file}", "kind=sft", ok=False).stderr  # fmt: skip
    assert "pip install 'igpt[data]'" in err and "Traceback" not in err, err
    err = run("-m", "igpt.lm_eval", "--model", "igpt", ok=False).stderr
    assert "pip install 'igpt[eval]'" in err and "Traceback" not in err, err


def test_every_cli_answers_help_with_its_keys_and_defaults(capsys):
    """`--help` on every key=value tool: exit 0, each key with its default (generate, chat and export once rejected it
    as "not key=value" and plan gave a Hydra parser error)."""
    import importlib

    tools = {"igpt.generate": ["checkpoint", "temperature", "default 0.8"], "igpt.chat": ["checkpoint", "system"],
             "igpt.export": ["checkpoint", "output", "max_shard_size", "default '5GB'"],
             "igpt.eval.__main__": ["tasks", "batch_size", "default 8"], "igpt.plan": ["world_size", "gpu_memory_gb"],
             "igpt.data.prepare": ["output_dir", "val_fraction", "default 0.05"],
             "igpt.data.tokenizer": ["vocab_size", "required"]}  # fmt: skip
    for module, expected in tools.items():
        main = importlib.import_module(module).main
        try:
            code = main(["--help"])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr().out
        assert code in (0, None), (module, code)
        assert out.startswith("usage: python -m") and all(e in out for e in expected), (module, out[:600])
