"""The machine's matmul peak as the runtime reaches it: the yardstick for per-stage GFLOP/s.

One large weight matmul (the shape of a ViT-L MLP layer), FP32 as exported, and INT8 and
FP16 by the same conversions the bundles use, on ONNX Runtime; BF16 on OpenVINO where this
CPU has BF16 units. Timed with the bench's thread count.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (1024, 1024, 4096)  # M, K, N


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
    """GFLOP/s (INT8: GOP/s) of the best of `repeats` runs, per precision."""
    from itemrt.backend import SessionOptions
    from itemrt.export.precision import convert
    from itemrt.openvino import bf16_support
    from itemrt.runtime import open_session

    m, k, n = SHAPE
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    flops = 2 * m * k * n
    out = {"shape_mkn": list(SHAPE)}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        _matmul_model(fp32, k, n)
        paths = {"fp32": fp32}
        for name in ("int8", "fp16"):
            paths[name] = Path(tmp) / f"{name}.onnx"
            convert(name, fp32, paths[name])
        if bf16_support() is None:
            paths["bf16"] = fp32
        for name, path in paths.items():
            s = open_session(path, f"peak_{name}", name, SessionOptions(threads=threads))
            s.run({"x": x})
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                s.run({"x": x})
                best = min(best, time.perf_counter() - t0)
            out[f"{name}_gflops"] = flops / best / 1e9
    return out
