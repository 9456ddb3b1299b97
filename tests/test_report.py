"""Tests for igpt/report.py: a pretrain and an SFT run trained here, reward-model / DPO / PPO runs synthesised in
their metrics.jsonl format, rendered into one page that a real headless Chromium (Debian's package) opens."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib

import pytest

from igpt.report import COLORS, grouped_keys, main, nice_ticks, read_run, render, run_names
from tests.conftest import TINY
from tests.trainutil import train


def common(data_dir: str, run_dir: str, stage: str) -> list[str]:
    return [
        f"+stage={stage}", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY, "trainer.global_batch_size=8",
        "trainer.micro_batch_size=8", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=0",
        "trainer.progress=false", "trainer.eval_batches=1", "trainer.sample_max_new_tokens=4",
        "logger.wandb.mode=disabled", "optim.warmup_steps=2",
    ]


def write_metrics(run_dir, records) -> str:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(run_dir)


def synthetic_alignment_runs(root) -> list[str]:
    """Metrics in the format the RM, DPO and PPO stages log (train and val records), plus task evals."""
    rm, dpo, ppo = [], [], []
    for step in range(1, 21):
        rm.append({"step": step, "split": "train", "loss": 0.7 - step * 0.01, "lr": 1e-4, "grad_norm": 1.0})
        dpo.append({"step": step, "split": "train", "loss": 0.69 - step * 0.005, "rewards/chosen": 0.01 * step,
                    "rewards/rejected": -0.01 * step, "rewards/accuracies": 0.5 + step / 50,
                    "rewards/margins": 0.02 * step, "logps/chosen": -40 + step, "logps/rejected": -42 - step})
        ppo.append({"step": step, "split": "train", "objective/kl": 0.002 * step, "objective/scores": 0.1 * step,
                    "objective/entropy": 3.0 - step / 20, "loss": 0.3, "lr": 1e-5})
        if step % 5 == 0:
            rm.append({"step": step, "split": "val", "loss": 0.68 - step * 0.01, "accuracy": 0.5 + step / 60,
                       "margin": step / 10, "reward_chosen": step / 20, "reward_rejected": -step / 20})
            ppo.append({"step": step, "split": "val", "objective/scores": 0.05 * step, "objective/kl": 0.001 * step,
                        "eval/topics/accuracy": 0.2 + step / 100, "eval/topics/macro_f1": 0.1 + step / 200})
    rm.append({"step": 20, "split": "val", "loss": float("nan"), "accuracy": 0.9})  # a non-finite value is skipped
    return [write_metrics(root / "rm", rm), write_metrics(root / "dpo", dpo), write_metrics(root / "ppo", ppo)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_text_dir, prepared_sft_dir):
    root = tmp_path_factory.mktemp("report")
    pretrain, sft = str(root / "pretrain"), str(root / "sft")
    train(common(prepared_text_dir, pretrain, "pretrain"))
    train(common(prepared_sft_dir, sft, "sft") + [f"init_from={pretrain}"])
    return [pretrain, sft, *synthetic_alignment_runs(root)]


def test_metrics_are_read_grouped_and_resumed_steps_keep_the_last_record(tmp_path):
    run = write_metrics(tmp_path / "a", [
        {"step": 1, "split": "train", "loss": 3.0}, {"step": 2, "split": "train", "loss": 2.0},
        {"step": 2, "split": "train", "loss": 2.5},  # a resumed run logs step 2 again
        {"step": 2, "split": "samples", "samples": [["Hi", "there"]]},
        {"step": 2, "split": "val", "loss": 2.2, "bpb": 1.1, "eval/topics/accuracy": 0.4, "flag": True},
    ])
    r = read_run(run)
    assert r.series[("train", "loss")] == [(1.0, 3.0), (2.0, 2.5)]
    assert ("val", "flag") not in r.series and r.samples == [(2, [["Hi", "there"]])]
    assert grouped_keys([r]) == [("Loss and bits per byte", ["loss", "bpb"]), ("eval/topics", ["eval/topics/accuracy"])]
    assert run_names(["x/a/sft", "y/b/sft", "z/pt"]) == ["a/sft", "b/sft", "z/pt"] and run_names(["r/a"]) == ["a"]
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0] and nice_ticks(3, 97) == [25, 50, 75]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1}\n{"loss": 2}\n')
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl:2: expected an object with a numeric \"step\""):
        read_run(str(tmp_path / "bad"))


def test_page_is_self_contained_with_a_plot_for_every_key(runs):
    page = render([read_run(p) for p in runs])
    svgs = re.findall(r'<svg xmlns="http://www.w3.org/2000/svg" class="plot".*?</svg>', page, re.S)
    for svg in svgs:
        ET.fromstring(svg)  # every plot is well-formed SVG
    titles = {ET.fromstring(s).find("{http://www.w3.org/2000/svg}text").text for s in svgs}
    want = {"loss", "bpb", "lr", "grad_norm", "tokens_per_s", "mfu", "accuracy", "margin", "rewards/chosen",
            "rewards/accuracies", "logps/chosen", "objective/kl", "objective/scores", "eval/topics/accuracy"}
    assert want <= titles
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert not re.search(r"\b(src|href)=", page)
    assert set(re.findall(r"https?://[^\s\"'<]+", page)) == {"http://www.w3.org/2000/svg"}  # the SVG namespace only
    assert "run_dir: " in page and "sft" in page  # the configs
    for group in ("Loss and bits per byte", "Optimisation", "Throughput and memory", "Stage metrics", "rewards",
                  "objective", "eval/topics"):
        assert f"<h2>{group}</h2>" in page


# ------------------------------------------------------------------------------------------------ headless Chromium
def chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (as tests/slurm_cluster.py installs Slurm)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get (as root) is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    for cmd in (["apt-get", "update", "-qq"], install):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return shutil.which("chromium")


def read_png(path: str):
    """An 8-bit RGB/RGBA PNG (what Chromium writes) as a numpy array ``(H, W, channels)``."""
    import numpy as np

    with open(path, "rb") as f:
        data = f.read()
    pos, idat = 8, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6) and body[12] == 0, "expected 8-bit RGB(A), not interlaced"
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, width * bpp + 1)
    out = np.zeros((height, width * bpp), dtype=np.int64)
    prev = np.zeros(width * bpp, dtype=np.int64)
    for y in range(height):  # undo the per-row filters of the PNG spec (section 9)
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if kind == 1:  # Sub: a running sum per channel
            line = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            line = (line + prev) % 256
        elif kind in (3, 4):  # Average, Paeth: sequential within the row
            cur, up = line.tolist(), prev.tolist()
            for i in range(len(cur)):
                a = cur[i - bpp] if i >= bpp else 0
                b, c = up[i], (up[i - bpp] if i >= bpp else 0)
                if kind == 3:
                    cur[i] = (cur[i] + (a + b) // 2) & 0xFF
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)  # |p-a|, |p-b|, |p-c| for p = a+b-c
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
            line = np.array(cur, dtype=np.int64)
        out[y] = prev = line
    return out.reshape(height, width, bpp)[..., :3]


def coloured_pixels(png: str, hex_color: str, tolerance: int = 40) -> int:
    import numpy as np

    img = read_png(png)
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=-1) <= tolerance).sum())


def test_report_renders_in_headless_chromium(runs, tmp_path):
    browser = chromium()
    out = str(tmp_path / "report.html")
    assert main([*runs, f"output={out}", "title=five runs"]) == 0
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
            "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", f"file://{out}"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not re.search(r"CONSOLE|Uncaught|Failed to load", dom.stderr), dom.stderr[-2000:]
    with open(out, encoding="utf-8") as f:
        n_plots = f.read().count('class="plot"')
    assert dom.stdout.count('class="plot"') == n_plots > 20 and "<title>five runs</title>" in dom.stdout

    # the plot lines are drawn: the screenshot holds far more pixels in the first runs' colours than the same page
    # with its lines and points hidden (what stays is the legends and the summary table's swatches)
    hidden = str(tmp_path / "hidden.html")
    with open(out, encoding="utf-8") as f, open(hidden, "w", encoding="utf-8") as g:
        g.write(f.read().replace("</style>", "svg.plot polyline,svg.plot circle{display:none}</style>"))
    counts = {}
    for name, page in (("report", out), ("hidden", hidden)):
        png = str(tmp_path / f"{name}.png")
        shot = subprocess.run([*base, "--window-size=1100,1300", f"--screenshot={png}", f"file://{page}"],
                              capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and os.path.exists(png), shot.stderr[-2000:]
        counts[name] = [coloured_pixels(png, c) for c in COLORS[:2]]
    assert all(full > hidden + 300 for full, hidden in zip(counts["report"], counts["hidden"])), counts
