"""From the workers' raw measurements to the report: statistics, the match check, GFLOP/s,
the terminal table, markdown, and deltas against an earlier report.

The JSON layout is documented in benchmarks/README.md (schema "itemrt-bench/4").
"""

from __future__ import annotations

import numpy as np

SCHEMA = "itemrt-bench/4"

# Stage groups shared by every backend (the reference chain times whole models).
GROUPS = {
    "captioner": ("captioner", "captioner_vision", "captioner_cross_kv", "captioner_decoder"),
    "detector": ("detector", "detector_image", "words", "detector_queries", "detector_head"),
    "clip": ("clip", "crops", "clip_image", "clip_text"),
    "decode, preprocess, head": ("decode", "preprocess", "head"),
}


def stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
    }


def backend_report(raw: dict, peak: dict, precision: str) -> dict:
    runs = raw["runs"]
    stages = list(runs[0])  # the order the chain ran them
    out = {
        "status": "ok",
        "precision": precision,
        "precisions": raw["precisions"],
        "load_s": raw["load_s"],
        "peak_rss_mb": raw["peak_rss_mb"],
        "torch_imported": raw["torch_imported"],
        "word_queries": raw["word_queries"],
        "stages_ms": {k: stats([r.get(k, 0.0) for r in runs]) for k in stages},
        "groups_ms": {
            g: float(np.median([sum(r.get(s, 0.0) for s in members) for r in runs])) for g, members in GROUPS.items()
        },
    }
    for key in ("text_cache", "throughput", "gpu", "gpu_peak_mb", "gpu_busy"):
        if key in raw:
            out[key] = raw[key]
    if raw.get("gpu_runs"):  # device time per stage (CUDA events), apart from the wall times above
        g = raw["gpu_runs"]
        out["gpu_stages_ms"] = {k: stats([r.get(k, 0.0) for r in g]) for k in g[0]}
    if "flops" in raw:
        out["gflops"] = _gflops(raw, peak, precision)
    if raw.get("ops_ms"):
        out["ops_ms"] = _ops(raw["ops_ms"])
    return out


def _ops(per_image: list[dict[str, dict[str, float]]]) -> dict:
    """Stage -> op type -> mean milliseconds per image in the profiled pass, largest first."""
    out = {}
    for stage in per_image[0]:
        ops = {op for img in per_image for op in img.get(stage, {})}
        mean = {op: float(np.mean([img.get(stage, {}).get(op, 0.0) for img in per_image])) for op in ops}
        out[stage] = dict(sorted(mean.items(), key=lambda kv: -kv[1]))
    return out


def _gflops(raw: dict, peak: dict, precision: str) -> dict:
    """Per stage: matmul GFLOP per image and the achieved rate, each run against its own image,
    set against the peak of the precision that stage's graph really ran in."""
    out = {}
    for stage in raw["flops"][0]:
        rates = [
            raw["flops"][i][stage] / (r[stage] / 1e3) / 1e9
            for r, i in zip(raw["runs"], raw["run_images"])
            if r.get(stage, 0.0) > 0
        ]
        gflop = float(np.mean([f[stage] for f in raw["flops"]]) / 1e9)
        if gflop == 0 or not rates:
            continue  # no matmuls recorded (e.g. an Einsum-only graph)
        rate = float(np.median(rates))
        top = peak.get(f"{raw['precisions'].get(stage, precision)}_gflops")
        out[stage] = {"gflop": gflop, "achieved_gflops": rate, "of_peak": rate / top if top else None}
    return out


def outputs_match(ref: dict, got: dict, exact: bool) -> list[str]:
    """Mismatches of one backend's outputs against the reference's (empty when they match).
    Exact (FP32): |Δp| ≤ 1e-4 too; otherwise the decision at 0.5 must agree."""
    bad = []
    for img, r in ref.items():
        g = got.get(img)
        if g is None:
            bad.append(f"{img}: not run")
            continue
        for key in ("tokens", "words", "found"):
            if r[key] != g[key]:
                bad.append(f"{img}: {key} differ")
        if exact and abs(r["p_fake"] - g["p_fake"]) > 1e-4:
            bad.append(f"{img}: |dp| {abs(r['p_fake'] - g['p_fake']):.1e} > 1e-4")
        if (r["p_fake"] >= 0.5) != (g["p_fake"] >= 0.5):
            bad.append(f"{img}: decision differs")
    return bad


# --- text -----------------------------------------------------------------------------------


def _ok(rep: dict) -> dict:
    return {k: b for k, b in rep["backends"].items() if b["status"] == "ok"}


def table(rep: dict) -> str:
    m, s = rep["machine"], rep["settings"]
    lines = [
        f"item-bench  {rep['bundle']}  (random-init: {rep['random_init']})",
        f"machine     {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB; ISA {' '.join(m['isa']) or '-'}",
        (f"settings    {s['runs']} runs after {s['warmup']} warm-up, tokens {s['tokens']}, objects {s['objects']}, "
        f"threads {s['threads'] or 'all'}, text cache {s['text_cache']}"),
        "matmul peak (best shape): " + ", ".join(
            f"{k[:-7]} {v:.0f} {'GOP/s' if k.startswith('int8') else 'GFLOP/s'} "
            f"({'x'.join(map(str, rep['matmul_peak'][k[:-7] + '_shape']))})"
            for k, v in rep["matmul_peak"].items() if k.endswith("_gflops")),
    ]
    ok = _ok(rep)
    for name, b in rep["backends"].items():
        if b["status"] != "ok":
            lines.append(f"{name:<12} skipped: {b['reason']}")
    names = list(ok)
    head = f"{'p50 ms (p90, p99)':<30}" + "".join(f"{n:>24}" for n in names)
    lines += ["", head, "-" * len(head)]

    def cell(x: dict | None) -> str:
        if not x:
            return ""
        f = ".0f" if x["p99"] >= 100 else ".1f"
        return f"{x['p50']:>9.1f} ({x['p90']:{f}}, {x['p99']:{f}})"

    for g in GROUPS:
        lines.append(f"{g:<30}" + "".join(f"{ok[n]['groups_ms'][g]:>24.1f}" for n in names))
    lines.append(f"{'end to end':<30}" + "".join(f"{cell(ok[n]['stages_ms']['total']):>24}" for n in names))
    fine = [n for n in names if "captioner_vision" in ok[n]["stages_ms"]]
    if fine:
        lines += ["", f"{'runtime stage':<30}" + "".join(f"{n:>24}" for n in fine)]
        for st in ok[fine[0]]["stages_ms"]:
            if st != "total":
                lines.append(f"  {st:<28}" + "".join(f"{cell(ok[n]['stages_ms'].get(st)):>24}" for n in fine))
    lines.append("")
    for n, b in ok.items():
        extra = ""
        if "speedup_vs_reference" in b:
            extra = f", {b['speedup_vs_reference']:.2f}x the reference, outputs match: {b['outputs_match_reference']}"
        lines.append(f"{n:<12} end to end p50 {b['stages_ms']['total']['p50']:.0f} ms{extra}; "
                     f"peak RSS {b['peak_rss_mb']:.0f} MB; load {b['load_s']:.1f} s; torch imported: {b['torch_imported']}")
        if "throughput" in b:
            t = b["throughput"]
            bs = ", ".join(f"batch {k}: {v['images_per_s']:.2f}" for k, v in t["batch"].items())
            cs = ", ".join(f"{k} callers: {v['images_per_s']:.2f}" for k, v in t["callers"].items())
            lines.append(f"{'':<12} images/s: {bs}; {cs}; peak RSS then {t['peak_rss_mb']:.0f} MB")
        if "gpu_stages_ms" in b:
            g = ", ".join(f"{st} {v['p50']:.1f}" for st, v in b["gpu_stages_ms"].items())
            lines.append(f"{'':<12} GPU ({b.get('gpu')}) time p50 ms, CUDA events: {g}; "
                         f"peak GPU memory {b.get('gpu_peak_mb', 0):.0f} MB")
        if "gpu_busy" in b:
            u = b["gpu_busy"]
            lines.append(f"{'':<12} GPU busy in a profiled run: " + (u["error"] if "error" in u else
                         f"{u['device_ms']:.1f} ms of {u['wall_ms']:.1f} ms ({u['busy_share']:.0%}) "
                         f"in {u['ops']} kernels and copies"))
        if "text_cache" in b:
            c = b["text_cache"]
            lines.append(f"{'':<12} caption cache ({c['mode']}): hit rate {c['hit_rate']:.2f}; word queries: {b['word_queries']}")
        if b.get("gflops"):
            g = ", ".join(
                f"{st} {v['achieved_gflops']:.0f}" + (f" ({v['of_peak'] * 100:.0f}%)" if v["of_peak"] else "")
                for st, v in b["gflops"].items()
            )
            lines.append(f"{'':<12} GFLOP/s (of peak): {g}")
        for st, ops in b.get("ops_ms", {}).items():
            total = sum(ops.values())
            if total >= 1.0:  # where a stage's time goes, by ONNX Runtime's profile (top 4 op types)
                top = ", ".join(f"{op} {_ms(ms)} ({ms / total:.0%})" for op, ms in list(ops.items())[:4])
                lines.append(f"{'':<12} {st} {_ms(total)} ms profiled: {top}")
    return "\n".join(lines)


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def markdown(rep: dict) -> str:
    ok = _ok(rep)
    names = list(ok)
    m, s = rep["machine"], rep["settings"]
    out = [
        (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, {m.get('gpu') or 'no GPU'}. "
         f"Bundle `{rep['bundle']}` "
        f"(random-init: {rep['random_init']}); {s['runs']} runs, {s['tokens']} tokens, {s['objects']} objects, "
        f"text cache {s['text_cache']}. Command: `{rep['command']}`"),
        "",
        "| stage, p50 ms | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    for g in GROUPS:
        out.append(f"| {g} | " + " | ".join(f"{ok[n]['groups_ms'][g]:.0f}" for n in names) + " |")
    out.append("| **end to end** | " + " | ".join(f"**{ok[n]['stages_ms']['total']['p50']:.0f}**" for n in names) + " |")
    out.append("| speedup vs reference | " + " | ".join(
        f"{ok[n].get('speedup_vs_reference', 1.0):.2f}x" for n in names) + " |")
    out.append("| outputs match reference | " + " | ".join(
        str(ok[n].get("outputs_match_reference", "-")) for n in names) + " |")
    out.append("| peak RSS MB | " + " | ".join(f"{ok[n]['peak_rss_mb']:.0f}" for n in names) + " |")
    if any("gpu_stages_ms" in ok[n] for n in names):
        out.append("| GPU time p50 ms (CUDA events) | " + " | ".join(
            f"{sum(v['p50'] for v in ok[n]['gpu_stages_ms'].values()):.0f}" if "gpu_stages_ms" in ok[n] else "-"
            for n in names) + " |")
    out.append("| images/s, batch 1 | " + " | ".join(
        f"{ok[n]['throughput']['batch']['1']['images_per_s']:.2f}" if "1" in ok[n].get("throughput", {}).get("batch", {})
        else f"{1000 / ok[n]['stages_ms']['total']['p50']:.2f}" for n in names) + " |")
    return "\n".join(out) + "\n"


def comparable(old) -> str | None:
    """Why an earlier report cannot be compared against, or None: checked before a long run,
    so that the run does not end in a KeyError."""
    if not isinstance(old, dict) or not str(old.get("schema", "")).startswith("itemrt-bench/"):
        return "not an item-bench --json report (no itemrt-bench schema)"
    backends = old.get("backends")
    if not isinstance(backends, dict):
        return "its backends are not an object"
    for name, b in backends.items():
        if not isinstance(b, dict):
            return f"backend {name} is not an object"
        if b.get("status", "ok") != "ok":
            continue
        stages = b.get("stages_ms")
        if not isinstance(stages, dict) or not all(
                isinstance(x, dict) and isinstance(x.get("p50"), (int, float)) for x in stages.values()):
            return f"backend {name} has no p50 per stage"
    return None


def compare(old: dict, new: dict) -> str:
    """p50 deltas per backend and stage, new against old."""
    lines = [f"compare: {old.get('created', '?')} -> {new.get('created', '?')}"]
    for name, b in _ok(new).items():
        o = old.get("backends", {}).get(name)
        if not o or o.get("status", "ok") != "ok":
            lines.append(f"{name}: not in the old report")
            continue
        lines.append(f"{name}:")
        for st, x in b["stages_ms"].items():
            if st not in o["stages_ms"]:
                continue
            a, c = o["stages_ms"][st]["p50"], x["p50"]
            pct = (c - a) / a * 100 if a else 0.0
            lines.append(f"  {st:<30}{a:>10.1f} -> {c:>10.1f} ms  {pct:+6.1f}%")
    return "\n".join(lines)
