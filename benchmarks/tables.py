"""The Markdown form of a report (the JSON holds the same numbers and more)."""
from __future__ import annotations


def _ms(x: float) -> str:
    return f"{x * 1e3:.3g}" if x * 1e3 < 100 else f"{x * 1e3:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def machine_line(result: dict) -> str:
    m, run = result["machine"], result["run"]
    where = m.get("gpu", "") + f" (CUDA {m.get('cuda')}), host " if run["device"] == "cuda" else ""
    load = m.get("load_average_1min")
    busy = "" if load is None else f", 1-min load average {load:.2f} at start"
    l3 = m.get("l3_cache", "?").split(" (")[0]  # lscpu: "32 MiB (1 instance)"
    return (f"{where}{m['cpu']} (L3 {l3}), {m['cpu_cores']} cores "
            f"({m['torch_threads']} torch threads), "
            f"torch {m['torch']}, {m['date']}{busy}")


def step_table(result: dict) -> list[str]:
    step, bw = result["step"], result["copy_bandwidth"]
    ref = step["ratio_to"]
    rows = [[r["method"], _ms(r["median"]), f"{_ms(r['p25'])}-{_ms(r['p75'])}",
             f"{_ms(r['p10'])}-{_ms(r['p90'])}", f"{r['ratio']:.2f}",
             f"{r['bytes'] / 1e6:.4g}", f"{r['GBps']:.3g}", f"{100 * r['GBps'] / bw['GBps']:.0f}%"]
            for r in step["rows"]]
    header = ["method", "median ms", "IQR ms", "p10-p90 ms", f"x {ref}", "MB moved",
              "GB/s", "% of copy"]
    return [f"### optimizer.step() over {step['workload']}", "",
            f"{step['numel'] / 1e6:.2f}M elements in {step['tensors']} tensors, "
            f"{step['steps']} timed steps after {step['warmup']} warm-up; copy bandwidth "
            f"{bw['GBps']:.1f} GB/s (read+write of a {bw['bytes'] / 2e6:.0f} MB copy_). "
            "MB moved is the least traffic the method's algorithm needs with the state dtypes "
            "it keeps; above 100% of copy means part of the working set stayed in cache.", ""
            ] + _table(header, rows)


def scaling_table(result: dict, key: str) -> list[str]:
    sweep = result["scaling"][key]
    header = ["method"] + [sweep["xfmt"].format(x) for x in sweep["x"]]
    rows = [[label] + [_ms(s["median"]) for s in series]
            for label, series in sweep["series"].items()]
    return [f"### {sweep['title']}: median step ms", "", sweep["note"], ""] + _table(header, rows)


def training_table(result: dict) -> list[str]:
    tr = result["training"]
    rows = [[r["method"], _ms(r["fwd_bwd_median"]), _ms(r["step_median"]),
             f"{100 * r['step_share']:.1f}%"] for r in tr["rows"]]
    return ([f"### Training-step share: {tr['setup']}", "",
             f"Medians over {tr['steps']} iterations after {tr['warmup']} warm-up.", ""]
            + _table(["method", "fwd+bwd ms", "step ms", "step share"], rows))


def markdown(result: dict) -> str:
    run = result["run"]
    lines = [f"## {run['model']} on {run['device']}, {run['dtype']}", "",
             f"Machine: {machine_line(result)}.", "", f"Command: `{run['command']}`", ""]
    if "step" in result:
        lines += step_table(result) + [""]
    for key in ("elements", "tensors"):
        if key in result.get("scaling", {}):
            lines += scaling_table(result, key) + [""]
    if "training" in result:
        lines += training_table(result) + [""]
    if result["skipped"]:
        lines += ["Not run here: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())
                  + ".", ""]
    return "\n".join(lines)
