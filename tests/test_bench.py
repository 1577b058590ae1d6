"""item-bench on the tiny bundle: both backends timed, every stage reported, outputs matched."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_report(tiny_bundle, samples, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "itemrt.bench.cli", str(tiny_bundle), "--runs", "2", "--json", str(out),
         "--images", *map(str, samples[:2])],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["outputs_match"] is True
    ort = rep["backends"]["onnxruntime"]
    assert ort["torch_imported"] is False  # the runtime is torch-free
    for stage in ("decode", "preprocess", "captioner_vision", "captioner_cross_kv", "captioner_decoder",
                  "detector_image", "detector_head", "crops", "clip_image", "clip_text", "head", "total"):
        assert ort["stages_ms"][stage]["p50"] > 0.0, stage
    ref = rep["backends"]["reference"]
    assert set(ref["stages_ms"]) >= {"captioner", "detector", "clip", "head", "total"}
    assert ref["peak_rss_mb"] > 0 and ort["peak_rss_mb"] > 0
    assert rep["speedup_p50"] > 0
    assert "speedup" in r.stdout and "outputs match: True" in r.stdout
