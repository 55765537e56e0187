"""Render benchmark results JSON (written by benchmarks/conftest.py) into a markdown table and a PNG plot.

    python benchmarks/results/render.py                                   # every benchmarks/results/*.json
    python benchmarks/results/render.py benchmarks/results/cpu-2core-2026-11-25.json --out benchmarks/results/

For each ``<name>.json`` it writes ``<name>.md`` (device, date, versions, commit, settings, one table per task with
images/s, latency percentiles, peak memory, speed-up against the reference eager model of the same group
measured in the same run, whether the fused path ran; skipped and failed cases with their reason) and
``<name>.png`` (speed-up vs reference eager per group and mode; matplotlib, Agg backend).
"""
import argparse
import glob
import json
import os
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path: str) -> Dict[str, Any]:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "results" not in doc or "device" not in doc:
        raise ValueError(f"{path}: not a gcvit benchmark results file (no 'results'/'device')")
    return doc


def _fmt(value: Optional[float], digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def device_title(doc: Dict[str, Any]) -> str:
    dev = doc["device"]
    if dev.get("type") == "cuda":
        return f"{dev.get('gpu', dev.get('name'))} (driver {dev.get('driver') or '?'}, CUDA {dev.get('cuda') or '?'})"
    return f"CPU {dev.get('cpu', '?')}, {dev.get('cpu_cores', '?')} cores, {dev.get('torch_threads', '?')} torch threads"


def _fused_cell(r: Dict[str, Any]) -> str:
    if r.get("impl") != "fused":
        return ""
    if r.get("fused_path_ran"):
        return "yes" if not r.get("gcvit_warnings") else "partly"
    return "NO (reference fallback)" if r.get("status") == "ok" else ""


def markdown(doc: Dict[str, Any], name: str) -> str:
    git = doc.get("git", {})
    ver = doc.get("versions", {})
    settings = doc.get("settings", {})
    commit = (git.get("commit") or "?")[:10] + (" (dirty working tree)" if git.get("dirty") else "")
    lines = [
        f"# GC ViT model benchmarks: {doc['device'].get('name')}, {doc.get('date')}",
        "",
        f"- Device: {device_title(doc)}",
        f"- Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items() if v),
        f"- Commit: {commit}; grid `{settings.get('grid')}`; {settings.get('rounds')} timed rounds x "
        f"{settings.get('iters')} step(s) per case after {settings.get('warmup')} warm-up step(s); "
        f"compile backend {settings.get('compile_backend')}",
        f"- Precision: inference {settings.get('infer_precision')}; training {settings.get('train_precision')}",
        f"- Command: `{doc.get('command', '?')}`",
        f"- Run: {doc.get('started_utc')} to {doc.get('finished_utc')} ({_fmt(doc.get('wall_s'), 0)} s wall); "
        f"load average at start {_load(doc.get('load_average_start'))}, end {_load(doc.get('load_average_end'))}",
        "- Speed-up: median over rounds of (reference eager round time / this case's round time), the rounds of "
        "the two interleaved in this run; the group's reference is GC ViT reference eager of the same variant, "
        "task, batch and size. `compile-frozen`: torch.compile with inductor freezing under no_grad. Peak memory: "
        "CUDA max allocated; CPU peak RSS of the process sampled during one untimed step after the timed ones (growth over the RSS "
        "before the case was built in brackets).",
        "",
    ]
    if doc.get("complete") is False:
        lines[1:1] = ["", "**Partial run**: the session was interrupted; only the cases below were measured."]
    ok = [r for r in doc["results"] if r.get("status") == "ok"]
    for task in ("infer", "train"):
        rows = [r for r in ok if r.get("task") == task]
        if not rows:
            continue
        title = "Inference" if task == "infer" else "Training step (forward, backward, SGD)"
        lines += [f"## {title}", "",
                  "| group | mode | img/s | p50 ms | p90 ms | p99 ms | peak MB | speed-up vs reference eager "
                  "| per-round speed-ups | fused path ran | first call s | notes |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|"]
        for r in rows:
            peak = _fmt(r.get("peak_memory_mb"), 0)
            if r.get("peak_memory_growth_mb") is not None:
                peak += f" ({r['peak_memory_growth_mb']:+,.0f})"
            lines.append(
                f"| {r['group']} | {r['mode']} | {_fmt(r.get('images_per_s'), 2)} | {_fmt(r.get('latency_ms_p50'))} | "
                f"{_fmt(r.get('latency_ms_p90'))} | {_fmt(r.get('latency_ms_p99'))} | {peak} | "
                f"{_fmt(r.get('speedup_vs_reference'), 2)}x | {_rounds(r)} | {_fused_cell(r)} | "
                f"{_fmt(r.get('first_call_s'), 1)} | {_notes(r)} |")
        lines.append("")
    others = [r for r in doc["results"] if r.get("status") != "ok"]
    if others:
        lines += ["## Skipped or failed", ""]
        for r in others:
            lines.append(f"- `{r['id']}`: {r.get('status')}: {r.get('reason')}")
        lines.append("")
    warned = sorted({w for r in doc["results"] for w in r.get("gcvit_warnings", []) or []})
    if warned:
        lines += ["## Fused-path warnings", ""] + [f"- {w}" for w in warned] + [""]
    lines.append(f"Plot: `{name}.png`. Source: `{name}.json`.")
    return "\n".join(lines) + "\n"


def _rounds(r: Dict[str, Any]) -> str:
    if r.get("mode") == "reference" and r.get("model") == "gcvit" and not r.get("compiled"):
        return ""
    return ", ".join(f"{v:.2f}" for v in r.get("speedup_rounds") or [])


def _notes(r: Dict[str, Any]) -> str:
    notes = []
    if r.get("dynamo_graphs") is not None:
        notes.append(f"{r['dynamo_graphs']} graph(s), {r.get('dynamo_graph_breaks', 0)} break(s)")
    if r.get("onnx_exporter"):
        notes.append(f"ONNX {r['onnx_exporter']} export, opset {r.get('onnx_opset')}, "
                     f"max diff {r.get('onnx_max_abs_diff_vs_reference', float('nan')):.1e}")
    return "; ".join(notes)


def _load(values) -> str:
    return "-" if not values else "/".join(f"{v:.1f}" for v in values)


def plot(doc: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r.get("status") == "ok" and r.get("speedup_vs_reference") is not None]
    tasks = [t for t in ("infer", "train") if any(r["task"] == t for r in ok)]
    if not tasks:
        raise ValueError("no successful results to plot")
    all_modes = list(dict.fromkeys(r["mode"] for r in ok))  # one colour per mode across the panels
    fig, axes = plt.subplots(len(tasks), 1, figsize=(11, 4.2 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        rows = [r for r in ok if r["task"] == task]
        groups: List[str] = list(dict.fromkeys(r["group"] for r in rows))
        modes: List[str] = list(dict.fromkeys(r["mode"] for r in rows))
        width = 0.8 / len(modes)
        cmap = plt.get_cmap("tab20")
        for i, mode in enumerate(modes):
            xs, ys, lo, hi = [], [], [], []
            for g, group in enumerate(groups):
                match = [r for r in rows if r["group"] == group and r["mode"] == mode]
                if match:
                    y = match[0]["speedup_vs_reference"]
                    spread = match[0].get("speedup_rounds") or [y]
                    xs.append(g - 0.4 + width * (i + 0.5))
                    ys.append(y)
                    lo.append(max(0.0, y - min(spread)))
                    hi.append(max(0.0, max(spread) - y))
            # bar: median over rounds; whisker: the smallest and largest per-round speed-up
            bars = ax.bar(xs, ys, width, label=mode, color=cmap(all_modes.index(mode) % 20), yerr=[lo, hi],
                          error_kw=dict(elinewidth=0.8, capsize=2, ecolor="0.3"))
            for bar, y in zip(bars, ys):
                ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 1), textcoords="offset points")
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel("speed-up vs reference eager")
        ax.set_title("inference" if task == "infer" else "training step", fontsize=10)
        ax.legend(fontsize=7, ncol=3, loc="upper left")
        top = max(max(r.get("speedup_rounds") or [r["speedup_vs_reference"]]) for r in rows)
        ax.set_ylim(0, max(1.2, top * 1.15))
        ax.text(0.99, 0.97, "bars: median of per-round speed-ups; whiskers: min-max over rounds",
                transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.3")
    fig.suptitle(f"GC ViT speed-up vs reference eager, same run: {device_title(doc)}, {doc.get('date')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(path: str, out_dir: Optional[str] = None) -> List[str]:
    """Write ``<name>.md`` and ``<name>.png`` for the results file ``path``; returns the two paths."""
    doc = load(path)
    name = os.path.splitext(os.path.basename(path))[0]
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    md_path, png_path = os.path.join(out_dir, name + ".md"), os.path.join(out_dir, name + ".png")
    with open(md_path, "w") as f:
        f.write(markdown(doc, name))
    plot(doc, png_path)
    return [md_path, png_path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", help="results JSON files (default: every benchmarks/results/*.json)")
    parser.add_argument("--out", default=None, help="output directory (default: next to each JSON)")
    args = parser.parse_args(argv)
    paths = args.results or sorted(glob.glob(os.path.join(HERE, "*.json")))
    if not paths:
        parser.error("no results JSON given or found in benchmarks/results/")
    for path in paths:
        for written in render(path, args.out):
            print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
