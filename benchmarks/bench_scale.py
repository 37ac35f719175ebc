"""Scale model (sparsecomm.simulate): calibrate here, check against emulated hosts, predict P = 8..512.

1. Calibrate the per-element CPU costs in one process, one thread (sparsecomm.simulate.calibrate).
2. Check: run the real exchange (benchmarks/exchange_worker.py: dense all-reduce, all-gather, split)
   on P = 2, 4, 8 emulated hosts at 100 Mbit/s and 1 Gbit/s (16.8M values, 1%), and compare each
   measured time with the model's prediction for that machine: CPU terms x P/2 (P ranks share 2
   cores), the link's shaped rate. Reports the error per row and its median.
3. Predict one exchange of GPT-2 124M at 1% for P in {8, 64, 512} on 0.1, 1, 10 and 100 Gbit/s,
   a core per rank, for the dense ring, the all-gather, the split all-reduce and PowerSGD rank 1.

    python benchmarks/bench_scale.py           # ~5 min as root (emulated hosts); writes results/scale.*
    python benchmarks/bench_scale.py --no-check   # calibration + predictions only (seconds)
    python benchmarks/bench_scale.py --render     # re-derive results/scale.* from results/scale.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_exchange  # noqa: E402
from common import RESULTS, figure_row, save_figure, table, write_results  # noqa: E402

from sparsecomm.cluster import can_create_namespaces  # noqa: E402
from sparsecomm.simulate import GPT2_124M, Calibration, Link, calibrate, predict  # noqa: E402

CHECK_NUMEL = 1 << 24
PATHS = ("dense", "allgather", "split", "powersgd")


def check(cal, links=("100", "1000"), worlds=(2, 4, 8)) -> list[dict]:
    out = []
    for link in links:
        for P in worlds:
            rows = bench_exchange.run_config(link, P, [CHECK_NUMEL], [0.01], reps=2)
            for r in rows:
                if r["case"] not in ("dense_allreduce", "sparse_exchange"):
                    continue
                path = "dense" if r["case"] == "dense_allreduce" else r["path"]
                pred = predict(path, CHECK_NUMEL, 0.01, P, Link(float(link) / 1000, 100e-6), cal,
                               cpu_share=max(1.0, P / 2), index=r.get("index_codec") or "rice")
                out.append({"link": f"{link} Mbit/s", "P": P, "path": path, "measured_s": r["time_s"],
                            "predicted_s": pred["total_s"], "predicted_wire_s": pred["wire_s"],
                            "predicted_cpu_s": pred["cpu_s"], "measured_cpu_s_max": r.get("cpu_s_max"),
                            "error": pred["total_s"] / r["time_s"] - 1})
    return out


def fit_overhead(checked: list[dict]) -> float:
    """What the per-element costs leave out of the sparse paths' CPU (framing, Python, the collectives'
    own CPU): the median over the check's sparse rows of measured CPU s / predicted CPU s (both per rank,
    the prediction without the P/2 sharing). In-sample: the check's errors after it are optimistic."""
    ratios = [r["measured_cpu_s_max"] / (r["predicted_cpu_s"] / max(1.0, r["P"] / 2)) for r in checked
              if r["path"] != "dense" and r.get("measured_cpu_s_max") and r["predicted_cpu_s"] > 0]
    return statistics.median(ratios) if ratios else 1.0


def predictions(cal, overhead: float = 1.0) -> list[dict]:
    rows = []
    for gbps in (0.1, 1, 10, 100):
        for P in (8, 64, 512):
            for path in PATHS:
                p = predict(path, GPT2_124M, 0.01, P, Link(gbps), cal, cpu_overhead=overhead, index="raw")
                rows.append({"gbps": gbps, "P": P, "path": path, **p})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    links = sorted({r["gbps"] for r in rows})
    fig, axes = figure_row(len(links), width=3.3, height=3.2)
    for ax, gbps in zip(axes, links):
        for p, color in zip(PATHS, ("0.5", "C2", "C0", "C1")):
            sub = [r for r in rows if r["gbps"] == gbps and r["path"] == p]
            ax.plot([r["P"] for r in sub], [r["total_s"] for r in sub], "o-", color=color, label=p, ms=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{gbps:g} Gbit/s", fontsize=9)
        ax.set_xlabel("P")
        ax.set_ylabel("predicted s / exchange")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-check", action="store_true", help="skip the emulated-host check")
    ap.add_argument("--render", action="store_true", help="rewrite results/scale.* from results/scale.json")
    a = ap.parse_args()
    if a.render:
        data = json.loads((RESULTS / "scale.json").read_text())
        cal, checked, why = Calibration(**data["calibration"]), data["check"], ""
    else:
        cal = calibrate()
        print("calibration:", asdict(cal), flush=True)
        ok, why = can_create_namespaces()
        checked = check(cal) if ok and not a.no_check else []
    overhead = fit_overhead(checked)
    for r in checked:  # the same rows with the fitted overhead (in-sample)
        pred = predict(r["path"], CHECK_NUMEL, 0.01, r["P"], Link(float(r["link"].split()[0]) / 1000, 100e-6), cal,
                       cpu_share=max(1.0, r["P"] / 2), cpu_overhead=overhead, index="rice")
        r["predicted_fitted_s"] = pred["total_s"]
        r["error_fitted"] = pred["total_s"] / r["measured_s"] - 1
    pred = predictions(cal, overhead)
    md = ["Model: sparsecomm/simulate.py (alpha-beta: wire = bytes / link rate, latency a per message, CPU from "
          "per-element costs measured in one process, one thread, on this machine). Calibration (seconds per element "
          "or entry): " + ", ".join(f"{k} {v:.3g}" for k, v in asdict(cal).items() if isinstance(v, float)) + ".\n\n"]
    if checked:
        md.append("## Check against emulated hosts (16.8M values, 1%, bf16 values, Rice indices; CPU terms x P/2: P ranks "
                  "share 2 cores; latency 100 us)\n\n")
        md.append(table(["link", "P", "path", "measured s", "predicted s", "pred. wire s", "pred. CPU s",
                         "measured CPU s (max rank)", "error", "with fitted overhead", "error (fitted)"],
                        [[r["link"], r["P"], r["path"], f"{r['measured_s']:.3f}", f"{r['predicted_s']:.3f}",
                          f"{r['predicted_wire_s']:.3f}", f"{r['predicted_cpu_s']:.3f}",
                          f"{r['measured_cpu_s_max']:.3f}" if r["measured_cpu_s_max"] is not None else "-",
                          f"{100 * r['error']:+.0f}%", f"{r['predicted_fitted_s']:.3f}", f"{100 * r['error_fitted']:+.0f}%"]
                         for r in checked]))
        errs = [abs(r["error"]) for r in checked]
        errs_f = [abs(r["error_fitted"]) for r in checked]
        md.append(f"\nFrom the per-element costs alone: median |error| {100 * statistics.median(errs):.0f}%, worst "
                  f"{100 * max(errs):.0f}% over {len(errs)} rows; the dense rows (wire-bound) are within 6%, the sparse "
                  f"rows are under-predicted: their measured CPU per rank is {overhead:.2f}x (median) what the "
                  f"per-element costs add up to (message framing, Python, the collectives' own CPU threads, the "
                  f"error-feedback commit). With that factor on the sparse paths' CPU (fitted on these rows, so "
                  f"in-sample): median |error| {100 * statistics.median(errs_f):.0f}%, worst {100 * max(errs_f):.0f}%.\n\n")
    else:
        md.append(f"Emulated-host check not run: {why or '--no-check'}.\n\n")
    md.append(f"## Predictions: GPT-2 124M update, 1%, a core per rank, raw int32 indices + bf16 values, latency 50 us, "
              f"sparse CPU x {overhead:.2f} (the fitted overhead)\n\n")
    body = []
    for gbps in (0.1, 1, 10, 100):
        for P in (8, 64, 512):
            sub = {r["path"]: r for r in pred if r["gbps"] == gbps and r["P"] == P}
            best = min(sub, key=lambda p: sub[p]["total_s"])
            body.append([f"{gbps:g}", P] + [f"{sub[p]['total_s']:.3f}" for p in PATHS] +
                        [best, f"{sub['dense']['total_s'] / sub['split']['total_s']:.1f}x",
                         f"{sub['powersgd']['total_s'] / sub['split']['total_s']:.2f}x"])
    md.append(table(["Gbit/s", "P"] + [f"{p} s" for p in PATHS] + ["fastest", "split vs dense", "split vs PowerSGD"], body))
    md.append("\n![](scale.png)\n\nReading: the all-gather's bytes and decode grow with P (every rank receives "
              "(P-1) k entries), the split path's stay at ~2k; a dense ring's wire time is flat in P. On this CPU the "
              "split path's cost is its selection pass over N and coding (~0.3-0.5 s per 124M update per core), which "
              "PowerSGD rank 1 undercuts (three matrix-vector passes); where that CPU work runs on a GPU (~ms), the "
              "split path is wire-bound: 2 k x 6 B per worker against PowerSGD's (sum of m + n) x 4 B. The model does "
              "not price quality: at equal steps PowerSGD rank 1 trains much less on a model whose gradients are not "
              "low-rank (results/ddp.md).\n")
    plot(pred, RESULTS / "scale.png")
    text = "".join(md)
    print(text)
    data = {"calibration": asdict(cal), "cpu_overhead": overhead, "check": checked, "predictions": pred}
    if a.render:
        old = json.loads((RESULTS / "scale.json").read_text())
        (RESULTS / "scale.json").write_text(json.dumps({**old, **data}, indent=2) + "\n")
        head = (RESULTS / "scale.md").read_text().split("\n\n", 2)
        (RESULTS / "scale.md").write_text("\n\n".join(head[:2]) + "\n\n" + text)
    else:
        print("wrote", write_results("scale", data, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
