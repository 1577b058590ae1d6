"""The machine's matmul peak as the runtime reaches it: the yardstick for per-stage GFLOP/s.

Weight matmuls of a few shapes (a ViT-L MLP layer with 1024 and 2048 rows, an OWL-ViT B/32 MLP
layer), FP32 as exported, and INT8 and FP16 by the same conversions the bundles use, on ONNX
Runtime; BF16 on OpenVINO where this CPU has BF16 units. Timed with the bench's thread count;
each precision keeps its best shape. One shape alone was not a peak: in one item-bench run
the detector's BF16 graph beat the 1024-row figure (117% of it), and timed ad hoc on this
project's Xeon, OpenVINO's BF16 ran the 1024-row layer at 470 GFLOP/s and the 2048-row one at
906 in one pass, and the 2048-row one at 376-683 between back-to-back passes.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = ((1024, 1024, 4096), (2048, 1024, 4096), (577, 768, 3072))  # M, K, N


def _matmul_model(path: Path, k: int, n: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32) * 0.02
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "peak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def measure(threads: int = 0, repeats: int = 20) -> dict:
    """Per precision, GFLOP/s (INT8: GOP/s) of the best of `repeats` runs at its best shape."""
    from itemrt.backends.openvino import bf16_support
    from itemrt.backends.ort import SessionOptions
    from itemrt.export.precision import convert

    out: dict = {"shapes_mkn": [list(s) for s in SHAPES]}
    with tempfile.TemporaryDirectory() as tmp:
        for m, k, n in SHAPES:
            x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
            fp32 = Path(tmp) / f"fp32-{k}x{n}.onnx"
            if not fp32.exists():
                _matmul_model(fp32, k, n)
            paths = {"fp32": fp32}
            for name in ("int8", "fp16"):
                paths[name] = fp32.with_name(f"{name}-{k}x{n}.onnx")
                if not paths[name].exists():
                    convert(name, fp32, paths[name])
            if bf16_support() is None:
                paths["bf16"] = fp32
            for name, path in paths.items():
                rate = 2 * m * k * n / _best_seconds(path, name, x, SessionOptions(threads=threads), repeats) / 1e9
                if rate > out.get(f"{name}_gflops", 0.0):
                    out[f"{name}_gflops"], out[f"{name}_shape"] = rate, [m, k, n]
    return out


def merge(a: dict, b: dict) -> dict:
    """The better of two measurements, precision by precision (with the shape that gave it)."""
    out = dict(a)
    for key, v in b.items():
        if key.endswith("_gflops") and v > out.get(key, 0.0):
            out[key], out[key.replace("_gflops", "_shape")] = v, b[key.replace("_gflops", "_shape")]
    return out


def _best_seconds(path: Path, precision: str, x: np.ndarray, options, repeats: int) -> float:
    from itemrt.backends import open_cpu

    s = open_cpu(path, f"peak_{precision}", precision, options)
    s.run({"x": x})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.run({"x": x})
        best = min(best, time.perf_counter() - t0)
    return best
