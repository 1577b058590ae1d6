"""item-bench on the tiny bundle: every backend timed, every stage reported, outputs matched,
the report's documented structure, charts, markdown and --compare."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from itemrt.bench.report import SCHEMA, backend_report, compare
from itemrt.bench.worker import _MATMUL_OPS, OVERHEAD, node_flops, profile_nodes
from itemrt.bundle import Bundle

RUNTIME_STAGES = ("decode", "preprocess", "captioner_vision", "captioner_cross_kv", "captioner_decoder",
                  "captioner_decoder_per_token", "detector_image", "words", "detector_queries", "detector_head",
                  "crops", "clip_image", "clip_text", "head", "total")


@pytest.fixture(scope="module")
def bench(tiny_bundle, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "itemrt.bench.cli", str(tiny_bundle), "--runs", "3", "--tokens", "8",
           "--objects", "2", "--batch-sizes", "1", "2", "--callers", "1", "2", "--throughput-repeats", "1",
           "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md"), "--charts", str(out / "charts"),
           "--images", *map(str, samples[:2])]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r, json.loads((out / "bench.json").read_text())


def test_report_structure_and_every_stage_timed(bench):
    _, r, rep = bench
    assert rep["schema"] == SCHEMA
    assert rep["settings"]["tokens"] == 8 and rep["settings"]["objects"] == 2
    assert rep["versions"]["onnxruntime"] and rep["machine"]["cores"] >= 1
    peak = rep["matmul_peak"]
    for p in ("fp32", "int8", "fp16"):  # each precision at the shape where it ran fastest
        assert peak[f"{p}_gflops"] > 0 and peak[f"{p}_shape"] in peak["shapes_mkn"]
    b = rep["backends"]
    assert b["tensorrt"]["status"] == "skipped" and b["tensorrt"]["reason"]
    import torch

    if not torch.cuda.is_available():  # the GPU baselines say why they did not run
        for name in ("reference-cuda", "reference-cuda-fp16"):
            assert b[name] == {"status": "skipped", "reason": "no CUDA device visible to PyTorch here"}
    ran = [n for n in ("ort-fp32", "ort-int8", "ort-fp16", "ov-bf16", "mixed") if b[n]["status"] == "ok"]
    assert "ort-fp32" in ran and "ort-int8" in ran  # the tiny bundle has INT8 graphs
    for name in ran:
        ort = b[name]
        assert ort["torch_imported"] is False  # the runtime is torch-free
        for stage in RUNTIME_STAGES:
            s = ort["stages_ms"][stage]
            assert s["p50"] > 0.0 and s["p50"] <= s["p90"] <= s["p99"], (name, stage)
        assert ort["outputs_match_reference"] is True, ort["mismatches"]
        assert ort["speedup_vs_reference"] > 0
        assert set(ort["throughput"]["batch"]) == {"1", "2"} and set(ort["throughput"]["callers"]) == {"1", "2"}
        assert all(v["images_per_s"] > 0 for v in ort["throughput"]["batch"].values())
        assert ort["text_cache"]["mode"] == "cold" and ort["text_cache"]["hit_rate"] == 0.0
        assert ort["gflops"]["clip_image"]["gflop"] > 0 and ort["gflops"]["clip_image"]["achieved_gflops"] > 0
        assert ort["peak_rss_mb"] > 0
        ops = ort["ops_ms"]  # where each stage's time went, by op type
        onnx_stages = {st for st, prec in ort["precisions"].items() if prec != "bf16"}  # BF16 runs on OpenVINO
        assert set(ops) == onnx_stages, name
        for st, o in ops.items():
            assert OVERHEAD in o and all(ms >= 0 for ms in o.values()), (name, st)
            assert list(o.values()) == sorted(o.values(), reverse=True), (name, st)
        assert _MATMUL_OPS & set(ops["captioner_decoder"]), ops  # never BF16: always on ONNX Runtime
    assert b["ort-int8"]["precision"] == "int8" and "int8" in b["ort-int8"]["precisions"].values()
    # Each stage is set against the peak of the precision its graph ran in.
    g = b["ort-int8"]["gflops"]
    for stage, prec in b["ort-int8"]["precisions"].items():
        if stage in g:
            assert g[stage]["of_peak"] == pytest.approx(g[stage]["achieved_gflops"] / rep["matmul_peak"][f"{prec}_gflops"])
    from itemrt.backends.openvino import bf16_support

    if bf16_support() is None:  # this CPU runs BF16: the tiny bundle was gated for it
        assert rep["matmul_peak"]["bf16_gflops"] > 0 and "ov-bf16" in ran
        assert b["ov-bf16"]["precisions"]["captioner_decoder"] == "fp32"  # never a bf16 candidate
        assert "bf16" in b["ov-bf16"]["precisions"].values()
        if "mixed" in Bundle.open(rep["bundle"]).precisions():  # INT8 graphs on ORT, BF16 ones on OpenVINO
            assert "mixed" in ran and {"int8", "bf16"} <= set(b["mixed"]["precisions"].values())
    else:
        for name in ("ov-bf16", "mixed"):
            assert b[name]["status"] == "skipped" and b[name]["reason"] == bf16_support()
    ref = b["reference"]
    assert set(ref["stages_ms"]) >= {"captioner", "detector", "clip", "head", "total"}
    assert ref["torch_imported"] is True
    # Each worker's own peak: the torch-free runtime's is below the reference's (torch alone is
    # hundreds of MB); a peak inherited from the bench parent across exec would hide that.
    assert b["ort-fp32"]["peak_rss_mb"] < ref["peak_rss_mb"]
    assert "end to end p50" in r.stdout and "outputs match: True" in r.stdout


def test_markdown_charts_and_compare(bench):
    out, _, rep = bench
    md = (out / "bench.md").read_text()
    assert "| **end to end** |" in md and "ort-int8" in md
    for png in ("stages.png", "batch.png"):
        assert (out / "charts" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    slower = json.loads(json.dumps(rep))
    slower["backends"]["ort-fp32"]["stages_ms"]["total"]["p50"] *= 2
    text = compare(rep, slower)
    assert "+100.0%" in text


def test_flops_of_matmul_and_conv():
    assert node_flops("MatMul", [[2, 3, 4], [4, 5]], [[2, 3, 5]]) == 2 * 2 * 3 * 5 * 4
    assert node_flops("DynamicQuantizeMatMul", [[7, 8], [8, 9]], [[7, 9]]) == 2 * 7 * 9 * 8
    assert node_flops("Conv", [[1, 3, 8, 8], [16, 3, 2, 2]], [[1, 16, 4, 4]]) == 2 * 16 * 16 * 3 * 4
    assert node_flops("Softmax", [[4, 4]], [[4, 4]]) == 0


def test_profile_counts_the_second_pass_only(tmp_path):
    """A real ONNX Runtime profile of a graph run twice, the second time with a twice larger
    batch: FLOPs and op times come from the second run alone."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((64, 32), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 32])], [w])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    so = ort.SessionOptions()
    so.enable_profiling, so.profile_file_prefix = True, str(tmp_path / "p")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": np.ones((3, 64), np.float32)})
    s.run(None, {"x": np.ones((6, 64), np.float32)})
    prof = profile_nodes(s.end_profiling())
    assert prof["flops"] == 2 * 6 * 32 * 64  # the second run's batch of 6, not 3 + 6
    assert set(prof["ops_ms"]) == {"MatMul", "Relu", OVERHEAD}
    assert all(ms >= 0 for ms in prof["ops_ms"].values()) and prof["ops_ms"]["MatMul"] > 0


def test_gpu_time_is_reported_apart_from_wall_time():
    """On CUDA the reference records CUDA-event time per stage; the report keeps it apart."""
    raw = {"runs": [{"captioner": 10.0, "clip": 4.0, "total": 14.0}, {"captioner": 11.0, "clip": 5.0, "total": 16.0}],
           "gpu_runs": [{"captioner": 8.0, "clip": 3.0}, {"captioner": 9.0, "clip": 3.5}],
           "precisions": {}, "load_s": 1.0, "peak_rss_mb": 1.0, "torch_imported": True, "word_queries": "towers",
           "gpu": "NVIDIA H100", "gpu_peak_mb": 512.0}
    b = backend_report(raw, {}, "fp16")
    assert b["stages_ms"]["captioner"]["p50"] == 10.5 and b["gpu_stages_ms"]["captioner"]["p50"] == 8.5
    assert b["gpu_stages_ms"]["clip"]["p50"] == 3.25 and b["gpu"] == "NVIDIA H100"
    assert "gpu_stages_ms" not in backend_report({**raw, "gpu_runs": []}, {}, "fp32")


@pytest.mark.parametrize("flag,value,says", [
    ("--compare", "missing.json", "--compare: cannot read a report"),
    ("--compare", "list.json", "not an item-bench --json report"),
    ("--compare", "other.json", "not an item-bench --json report"),
    ("--compare", "no-p50.json", "backend ort-fp32 has no p50 per stage"),
    ("--json", "a-file/report.json", "--json: cannot make the folder"),
    ("--charts", "a-file", "--charts: cannot make the folder"),
])
def test_bad_output_paths_fail_before_the_run(tiny_bundle, tmp_path, capsys, flag, value, says):
    from itemrt.bench.cli import main

    (tmp_path / "a-file").write_text("in the way")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text('{"schema": "someone-else/1", "backends": {}}')
    (tmp_path / "no-p50.json").write_text(json.dumps(
        {"schema": SCHEMA, "backends": {"ort-fp32": {"status": "ok", "stages_ms": {"total": {"p90": 1.0}}}}}))
    with pytest.raises(SystemExit) as e:
        main([str(tiny_bundle), "--backends", "ort-fp32", flag, str(tmp_path / value)])
    assert e.value.code == 2 and says in capsys.readouterr().err
