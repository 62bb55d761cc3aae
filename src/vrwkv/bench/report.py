"""Markdown table and PNG plots of a benchmark report (see :mod:`vrwkv.bench.runner`)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from vrwkv.bench.runner import PAIRS, display_name


def matmul_peaks(rows: list[dict]) -> dict[str, float]:
    """GFLOP/s of the square fp32 product per backend measured ("torch": torch.mm, "onednn")."""
    return {r["spec"].get("backend", "torch"): r["result"]["gflops"] for r in rows
            if r["spec"]["kind"] == "matmul_peak" and "error" not in r["result"]}


def _machine_peaks(rows: list[dict]) -> tuple[float | None, float | None]:
    """The machine's fp32 matmul peak (the fastest backend measured) and its copy bandwidth."""
    peaks = matmul_peaks(rows)
    bw = None
    for r in rows:
        if r["spec"]["kind"] == "copy_bandwidth" and "error" not in r["result"]:
            bw = r["result"]["bytes_per_s"]
    return (max(peaks.values()) if peaks else None), bw


def merged_model_results(rows: list[dict]) -> list[tuple[dict, dict, int]]:
    """``(spec, result, rounds)`` per model measurement, the rounds of one spec (``vrwkv bench --rounds``) merged:
    the median of the rounds' medians (time, CPU time, page faults), min and max over all runs, the largest peak
    memory. Failed rounds are left out unless every round failed."""
    by_spec: dict[str, tuple[dict, list[dict]]] = {}
    for r in rows:
        if r["spec"]["kind"] == "model":
            by_spec.setdefault(json.dumps(r["spec"], sort_keys=True), (r["spec"], []))[1].append(r["result"])
    merged = []
    for spec, results in by_spec.values():
        ok = [res for res in results if "error" not in res]
        res = dict(ok[0] if ok else results[0])
        if len(ok) > 1:
            res.update(median_s=statistics.median(x["median_s"] for x in ok), min_s=min(x["min_s"] for x in ok),
                       max_s=max(x["max_s"] for x in ok), peak_rss_mb=max(x["peak_rss_mb"] for x in ok))
            for key in ("cpu_median_s", "minor_faults_per_run"):
                if all(key in x for x in ok):
                    res[key] = statistics.median(x[key] for x in ok)
            if all(x.get("tensor_peak_mb") for x in ok):
                res["tensor_peak_mb"] = max(x["tensor_peak_mb"] for x in ok)
        merged.append((spec, res, len(ok) or len(results)))
    return merged


def model_rows(report: dict) -> list[dict]:
    """Flatten model measurements (rounds merged): per-image time, GFLOP/s, % of peak, and the time ratio
    reference / ours."""
    rows = report["rows"]
    peak, _ = _machine_peaks(rows)
    out = []
    by_key = {}
    for s, res, rounds in merged_model_results(rows):
        row = dict(pair=s["pair"], model=display_name(s), base_model=s["model"], mode=s["mode"], size=s["size"][0],
                   batch=s["batch"], rounds=rounds, error=res.get("error"))
        if "error" not in res:
            row.update(per_image_s=res["median_s"] / s["batch"], min_s=res["min_s"] / s["batch"],
                       max_s=res["max_s"] / s["batch"], peak_rss_mb=res["peak_rss_mb"], params=res["params"])
            if "cpu_median_s" in res:
                row["cpu_per_image_s"] = res["cpu_median_s"] / s["batch"]
            if res.get("tensor_peak_mb"):
                row["tensor_peak_mb"] = res["tensor_peak_mb"]
            if "minor_faults_per_run" in res:
                row["faults_per_run"] = res["minor_faults_per_run"]
            if res.get("flops"):
                row["gflop_per_image"] = res["flops"] / s["batch"] / 1e9
                row["gflops_achieved"] = res["flops"] / res["median_s"] / 1e9
                row["pct_of_peak"] = 100 * row["gflops_achieved"] / peak if peak else None
        out.append(row)
        by_key[(s["pair"], row["model"], s["mode"], s["size"][0], s["batch"])] = row
    for row in out:
        ours, ref = PAIRS[row["pair"]]
        if row["base_model"] == ours and "per_image_s" in row:
            other = by_key.get((row["pair"], ref, row["mode"], row["size"], row["batch"]))
            if other and "per_image_s" in other:
                row["speedup_vs_ref"] = other["per_image_s"] / row["per_image_s"]
                if "cpu_per_image_s" in row and "cpu_per_image_s" in other:
                    row["cpu_speedup_vs_ref"] = other["cpu_per_image_s"] / row["cpu_per_image_s"]
                row["memory_vs_ref"] = row["peak_rss_mb"] / other["peak_rss_mb"]
                if "tensor_peak_mb" in row and "tensor_peak_mb" in other:
                    row["tensor_memory_vs_ref"] = row["tensor_peak_mb"] / other["tensor_peak_mb"]
            same_gemm = by_key.get((row["pair"], ref + "+onednn", row["mode"], row["size"], row["batch"]))
            if same_gemm and "per_image_s" in same_gemm:  # the ViT with its Linears through oneDNN too
                row["speedup_vs_ref_onednn"] = same_gemm["per_image_s"] / row["per_image_s"]
    return out


def wkv_rows(report: dict) -> list[dict]:
    _, bw = _machine_peaks(report["rows"])
    out = []
    for r in report["rows"]:
        s, res = r["spec"], r["result"]
        if s["kind"] != "wkv":
            continue
        variant = ", ".join(([
            "token-major"] if s.get("layout") == "tokens" else []) + (["into out="] if s.get("out") else []))
        impl = s["impl"] + (f" ({variant})" if variant else "")
        row = dict(impl=impl, backward=s["backward"], T=s["T"], C=s["C"], error=res.get("error"))
        if "error" not in res:
            row["median_s"] = res["median_s"]
            if bw and s["impl"] != "reference" and not s["backward"]:
                floor = 3 * 4 * s["B"] * s["T"] * s["C"] / bw  # k, v read and y written once, float32
                row["bandwidth_floor_s"] = floor
                row["x_floor"] = res["median_s"] / floor
        out.append(row)
    return out


def _fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def _allocator_note(report: dict) -> list[str]:
    config = report.get("config", {})
    if config.get("malloc_keep"):
        from vrwkv.tools.cpu_memory import KEEP_FREED_MEMORY_ENV

        settings = " ".join(f"{k}={v}" for k, v in KEEP_FREED_MEMORY_ENV.items())
        return [f"Every measurement ran with {settings} (glibc keeps freed memory in the heap: temporaries reuse "
                "mapped pages instead of page-faulting fresh ones)."]
    threshold = config.get("malloc_mmap_threshold")
    if not threshold:
        return []
    return [f"Every measurement ran with MALLOC_MMAP_THRESHOLD_={threshold} (glibc: blocks of that size and larger are "
            "mapped and returned on free, so peak RSS follows live tensors)."]


def _rounds_note(report: dict) -> list[str]:
    rounds = report["config"].get("rounds", 1)
    if rounds <= 1:
        return []
    return [f"Every model measurement ran {rounds} times, alternating with its pair's (fresh processes); times are the "
            "median of the rounds' medians, min–max over all runs, memory the largest of the rounds."]


def write_markdown(report: dict) -> str:
    peak, bw = _machine_peaks(report["rows"])
    peaks = matmul_peaks(report["rows"])
    by_backend = ", ".join(f"{name} {value:.0f}" for name, value in sorted(peaks.items()))
    m = report["machine"]
    lines = [
        f"Benchmark {'from ' + report['started'] + ' to' if report.get('started') else 'of'} {report['date']} on "
        f"{m['platform']} ({m['cpu_count']} CPUs"
        f"{': ' + m['cpu_model'] if m.get('cpu_model') else ''}"
        f"{', torch kernels ' + m['cpu_capability'] if m.get('cpu_capability') else ''}), "
        f"torch {m['torch']}, timm {m['timm']}.",
        f"fp32 matmul peak measured in this run (2048³, GFLOP/s): {by_backend or '—'}; "
        f"\"% of peak\" is of the fastest, {_fmt(peak, '.0f')} GFLOP/s. Copy bandwidth: {_fmt(bw / 1e9 if bw else None, '.1f')} GB/s.",
        *_allocator_note(report),
        *_rounds_note(report),
        "Memory: peak RSS of the measurement's process (libraries' code pages and the heap malloc keeps included), "
        "and the peak of its tensors (alive between calls, plus the most one call allocated on top: "
        "torch.profiler's memory events).",
        "",
        "| model | mode | size | batch | s/image (median) | min–max | CPU s/image | GFLOP/image | GFLOP/s | % of peak "
        "| peak RSS (MB) | tensor peak (MB) | page faults / run | speed-up vs ViT (wall) | speed-up vs ViT (CPU) "
        "| memory vs ViT (RSS) | memory vs ViT (tensors) | speed-up vs ViT+onednn (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in model_rows(report):
        if r["error"]:
            lines.append(f"| {r['model']} | {r['mode']} | {r['size']} | {r['batch']} | failed: {r['error']} |||||||||||||")
            continue
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['size']} | {r['batch']} | {r['per_image_s']:.4g} | "
            f"{r['min_s']:.3g}–{r['max_s']:.3g} | {_fmt(r.get('cpu_per_image_s'), '.4g')} | "
            f"{_fmt(r.get('gflop_per_image'))} | {_fmt(r.get('gflops_achieved'), '.0f')} | "
            f"{_fmt(r.get('pct_of_peak'), '.0f')} | {r['peak_rss_mb']:.0f} | {_fmt(r.get('tensor_peak_mb'), '.1f')} | "
            f"{_fmt(r.get('faults_per_run'), '.0f')} | "
            f"{_fmt(r.get('speedup_vs_ref'), '.2f')} | "
            f"{_fmt(r.get('cpu_speedup_vs_ref'), '.2f')} | {_fmt(r.get('memory_vs_ref'), '.2f')} | "
            f"{_fmt(r.get('tensor_memory_vs_ref'), '.2f')} | "
            f"{_fmt(r.get('speedup_vs_ref_onednn'), '.2f')} |"
        )
    wr = wkv_rows(report)
    if wr:
        lines += ["", "Bi-WKV op (B=1, official semantics):", "",
                  "| impl | pass | T | C | median s | bandwidth floor s | × floor |", "|---|---|---|---|---|---|---|"]
        for r in wr:
            p = "fwd+bwd" if r["backward"] else "fwd"
            if r["error"]:
                lines.append(f"| {r['impl']} | {p} | {r['T']} | {r['C']} | failed: {r['error']} |||")
            else:
                lines.append(f"| {r['impl']} | {p} | {r['T']} | {r['C']} | {r['median_s']:.4g} | "
                             f"{_fmt(r.get('bandwidth_floor_s'))} | {_fmt(r.get('x_floor'), '.1f')} |")
    return "\n".join(lines) + "\n"


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    """time_vs_resolution.png and memory_vs_resolution.png (log scales, ours vs ViT, inference at batch 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in model_rows(report) if not r["error"] and r["mode"] == "infer" and r["batch"] == 1]
    paths = []
    for key, ylabel, name in (("per_image_s", "seconds per image", "time_vs_resolution.png"),
                              ("peak_rss_mb", "peak memory (MB): RSS, and tensors (dashed)", "memory_vs_resolution.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in sorted({r["model"] for r in rows}):
            pts = sorted((r["size"], r[key]) for r in rows if r["model"] == model)
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
            tensors = sorted((r["size"], r["tensor_peak_mb"]) for r in rows if r["model"] == model
                             and "tensor_peak_mb" in r)
            if key == "peak_rss_mb" and tensors:  # the tensors alone, dashed in the same colour
                ax.plot([p[0] for p in tensors], [p[1] for p in tensors], marker=".", linestyle="--",
                        color=line.get_color(), label=f"{model} (tensors)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("image side (px), batch 1, inference")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if rows:  # (an op-only run has no model curves)
            ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
