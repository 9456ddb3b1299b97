"""A run report without a W&B server: one self-contained HTML page with every metric of one or more runs.

    python -m igpt.report <run_dir> [<run_dir> ...] output=report.html [title="..."]

Every numeric key of each run's ``metrics.jsonl`` becomes a line plot against the step, with one line per (run,
split): several runs on one plot compare directly (one colour per run; train solid, val dashed, other splits dotted).
Plots are grouped: loss and bits per byte; optimisation (lr, grad norm); throughput and memory (tokens/s, MFU);
the stage's own unprefixed metrics (a reward model's ``accuracy``, ``margin``, ...); then one group per key prefix,
so ``rewards/*`` and ``logps/*`` (DPO), ``objective/*`` (PPO) and ``eval/<task>/*`` (task metrics) each get theirs.
The page also holds a summary table, the last logged sample generations and each run's ``config.yaml``.

The page is static HTML with inline SVG (the plot style of nanoGPT-era training logs: lines on a light grid, native
``<title>`` tooltips on the points) and inline CSS: no script, no font, no stylesheet or image from anywhere else, so
it opens offline and can be mailed or attached to an issue. A resumed run logs the steps it redoes again; the last
record of each (split, step) wins, as in ``tests/trainutil.read_metrics``.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")
DASHES = {"train": "", "val": "7 4"}
OTHER_DASH = "2 3"
SKIP_KEYS = ("step", "split", "time")
BUILTIN_GROUPS = (
    ("Loss and bits per byte", ("loss", "bpb")),
    ("Optimisation", ("lr", "grad_norm", "skipped_steps")),
    ("Throughput and memory", ("tokens_per_s", "mfu", "tokens", "peak_mem_gb")),
)
STAGE_GROUP = "Stage metrics"
MAX_POINTS = 2000  # per series; longer series are thinned evenly (the last point is always kept)


@dataclass
class Run:
    """One run directory read back: ``series[(split, key)]`` is a list of ``(step, value)`` sorted by step."""

    path: str
    name: str
    series: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    config: str = ""
    samples: list[tuple[int, list]] = field(default_factory=list)


def read_run(path: str, name: str | None = None) -> Run:
    """Read ``<path>/metrics.jsonl`` (and ``config.yaml`` when present); ValueError naming a bad line."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(metrics):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is it an igpt run directory?)")
    last: dict[tuple[str, str], dict[float, float]] = {}
    run = Run(path, name or os.path.basename(os.path.normpath(path)))
    with open(metrics, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{metrics}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                raise ValueError(f'{metrics}:{lineno}: expected an object with a numeric "step"')
            split = str(rec.get("split", "train"))
            if split == "samples":
                run.samples.append((int(rec["step"]), rec.get("samples") or []))
                continue
            for key, value in rec.items():
                if key in SKIP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                last.setdefault((split, key), {})[float(rec["step"])] = float(value)
    run.series = {k: sorted(v.items()) for k, v in last.items()}
    config = os.path.join(path, "config.yaml")
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            run.config = f.read()
    return run


def run_names(paths: Sequence[str]) -> list[str]:
    """Short distinct names: the folder name, or more of the path where two runs share it."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n} ({i})" for i, n in enumerate(names)]


# ----------------------------------------------------------------------------------------------------------- grouping
def group_of(key: str) -> str:
    """The section a metric key is plotted in (module docstring)."""
    if "/" in key:
        return key.rsplit("/", 1)[0]
    for title, keys in BUILTIN_GROUPS:
        if key in keys:
            return title
    return STAGE_GROUP


def grouped_keys(runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    """``[(group title, [keys])]`` in page order: built-in groups, the stage's metrics, then prefixes A-Z."""
    keys = sorted({key for run in runs for _, key in run.series})
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(group_of(key), []).append(key)
    order = {title: i for i, (title, _) in enumerate(BUILTIN_GROUPS)}
    order[STAGE_GROUP] = len(order)
    builtin_rank = {k: i for _, ks in BUILTIN_GROUPS for i, k in enumerate(ks)}
    out = []
    for title in sorted(groups, key=lambda t: (order.get(t, len(order) + 1), t)):
        out.append((title, sorted(groups[title], key=lambda k: (builtin_rank.get(k, len(builtin_rank)), k))))
    return out


# ----------------------------------------------------------------------------------------------------------- SVG
def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def fmt(value: float) -> str:
    """Short tick and table labels: 0.0123, 5.861, 12.5k, 3.2M, 1.50e-04."""
    if not math.isfinite(value):
        return str(value)
    a = abs(value)
    if a == 0:
        return "0"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if a >= scale:
            return f"{value / (scale if suffix != 'k' else 1e3):.4g}{suffix}"
    if a < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def thin(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    stride = len(points) / (limit - 1)
    return [points[int(i * stride)] for i in range(limit - 1)] + [points[-1]]


def svg_plot(title: str, lines: Sequence[dict[str, Any]], width: int = 520, height: int = 280) -> str:
    """One line plot as an inline ``<svg>``: ``lines`` hold ``label``, ``color``, ``dash`` and ``points``."""
    left, right, top, bottom = 64, 14, 28, 38
    pts = [(x, y) for line in lines for x, y in line["points"] if math.isfinite(x) and math.isfinite(y)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{width / 2:.1f}" y="17" class="title" text-anchor="middle">{html.escape(title)}</text>']
    if not pts:
        out.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle">no finite values</text>')
        return "".join(out) + "</svg>"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    else:
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    for t in nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
    for t in nice_ticks(x0, x1):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" class="axis">step</text>')
    for line in lines:
        finite = [(x, y) for x, y in thin(line["points"]) if math.isfinite(x) and math.isfinite(y)]
        if not finite:
            continue
        label = html.escape(line["label"])
        dash = f' stroke-dasharray="{line["dash"]}"' if line["dash"] else ""
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{line["color"]}" stroke-width="1.6"{dash}>'
                   f"<title>{label}</title></polyline>")
        if len(finite) <= 24:  # few points (evaluations): mark each, with its value as a tooltip
            for x, y in finite:
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{line["color"]}">'
                           f"<title>{label}: step {fmt(x)}, {fmt(y)}</title></circle>")
    return "".join(out) + "</svg>"


def legend(entries: Sequence[tuple[str, str, str]]) -> str:
    """HTML legend: a short line in each series' colour and dash, then its label."""
    items = []
    for label, color, dash in entries:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        items.append(f'<span class="key"><svg xmlns="http://www.w3.org/2000/svg" width="26" height="10">'
                     f'<line x1="1" y1="5" x2="25" y2="5" stroke="{color}" stroke-width="2"{d}/></svg>'
                     f"{html.escape(label)}</span>")
    return '<div class="legend">' + "".join(items) + "</div>"


# ----------------------------------------------------------------------------------------------------------- page
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.meta{color:#666}.grid-plots{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;border:1px solid #e3e3e3;border-radius:4px;padding:6px;background:#fcfcfc;width:520px}
svg.plot text{font:11px system-ui,sans-serif;fill:#444}svg.plot text.title{font-size:13px;font-weight:600;fill:#222}
svg.plot .frame{fill:#fff;stroke:#bbb}svg.plot .grid{stroke:#eee}
.legend{display:flex;flex-wrap:wrap;gap:4px 12px;font-size:12px;margin-top:2px}
.key svg{vertical-align:middle;margin-right:3px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:8px;overflow:auto;max-height:480px;font-size:12px}
"""


def _last(run: Run, split: str, key: str) -> float | None:
    finite = [y for _, y in run.series.get((split, key), []) if math.isfinite(y)]
    return finite[-1] if finite else None


def _config_value(run: Run, *keys: str) -> str:
    import yaml

    try:
        node: Any = yaml.safe_load(run.config) or {}
        for k in keys:
            node = node[k]
    except (yaml.YAMLError, KeyError, TypeError):
        return "-"
    return str(node)


def summary_table(runs: Sequence[Run]) -> str:
    cols = [("train", "loss"), ("val", "loss"), ("val", "bpb")]
    head = "".join(f"<th>last {s} {k}</th>" for s, k in cols)
    rows = []
    for i, run in enumerate(runs):
        steps = max((p[-1][0] for p in run.series.values() if p), default=0)
        cells = "".join(f'<td class="num">{fmt(v) if (v := _last(run, s, k)) is not None else "-"}</td>'
                        for s, k in cols)
        rows.append(f'<tr><td><span style="color:{COLORS[i % len(COLORS)]}">&#9632;</span> {html.escape(run.name)}'
                    f"</td><td>{html.escape(run.path)}</td><td>{html.escape(_config_value(run, 'stage', 'name'))}</td>"
                    f"<td>{html.escape(_config_value(run, 'model', 'name'))}</td>"
                    f'<td class="num">{fmt(steps)}</td>{cells}</tr>')
    return (f"<table><tr><th>run</th><th>directory</th><th>stage</th><th>model</th><th>steps</th>{head}</tr>"
            f"{''.join(rows)}</table>")


def samples_section(runs: Sequence[Run]) -> str:
    rows = []
    for run in runs:
        if not run.samples:
            continue
        step, pairs = run.samples[-1]
        for pair in pairs[:8]:
            prompt, text = (pair + ["", ""])[:2] if isinstance(pair, list) else (str(pair), "")
            rows.append(f"<tr><td>{html.escape(run.name)}</td><td class='num'>{step}</td>"
                        f"<td>{html.escape(str(prompt))}</td><td>{html.escape(str(text))}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Last sample generations</h2><table><tr><th>run</th><th>step</th><th>prompt</th><th>generation</th>"
            f"</tr>{''.join(rows)}</table>")


def render(runs: Sequence[Run], title: str = "igpt run report") -> str:
    """The whole HTML page for ``runs``."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<div class='meta'>{len(runs)} run(s), generated {time.strftime('%Y-%m-%d %H:%M:%S')}</div>",
             "<h2>Runs</h2>", summary_table(runs)]
    for group, keys in grouped_keys(runs):
        figures = []
        for key in keys:
            lines, entries = [], []
            for i, run in enumerate(runs):
                for (split, k), points in sorted(run.series.items()):
                    if k != key:
                        continue
                    color, dash = COLORS[i % len(COLORS)], DASHES.get(split, OTHER_DASH)
                    label = f"{run.name} · {split}"
                    lines.append({"label": label, "color": color, "dash": dash, "points": points})
                    entries.append((label, color, dash))
            figures.append(f"<figure>{svg_plot(key, lines)}{legend(entries)}</figure>")
        parts.append(f"<h2>{html.escape(group)}</h2><div class='grid-plots'>{''.join(figures)}</div>")
    parts.append(samples_section(runs))
    configs = [f"<details><summary>{html.escape(r.name)}: {html.escape(os.path.join(r.path, 'config.yaml'))}"
               f"</summary><pre>{html.escape(r.config)}</pre></details>" for r in runs if r.config]
    if configs:
        parts.append("<h2>Configs</h2>" + "".join(configs))
    parts.append("</body></html>")
    return "\n".join(parts)


def report(run_dirs: Sequence[str], output: str, title: str = "igpt run report") -> str:
    """Write the report of ``run_dirs`` to ``output``; return ``output``."""
    if not run_dirs:
        raise ValueError("igpt.report: give at least one run directory")
    runs = [read_run(p, n) for p, n in zip(run_dirs, run_names(run_dirs))]
    page = render(runs, title)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, output)
    return output


SPEC = {"output": (str, "report.html"), "title": (str, "igpt run report")}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m igpt.report <run_dir> ... [output=] [title=]``: run directories, then igpt's key=value options."""
    from igpt.cli import parse, run
    from igpt.errors import ConfigError

    def _main(args: list[str]) -> int:
        if not args:
            print(__doc__)
            return 2
        run_dirs = [a for a in args if ("=" not in a or os.path.isdir(a)) and a not in ("-h", "--help")]
        options = parse([a for a in args if a not in run_dirs], SPEC, "igpt.report", __doc__)
        try:
            print(report(run_dirs, options["output"], options["title"]))
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        return 0

    return run("igpt.report", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
