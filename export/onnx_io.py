"""torch module -> ONNX file, and the manifest's description of its I/O."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

OPSET = 17

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> dict:
    """Export with the TorchScript-based exporter (fast, and it keeps dynamic axes as asked).

    Returns the component's manifest entry: file name, opset, I/O names, dtypes, shapes.
    """
    module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # The fused MHA fast path is not traceable; the math path gives the same numbers.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path))
    return {
        "file": path.name,
        "opset": OPSET,
        "precision": "fp32",
        "inputs": [_describe(v) for v in model.graph.input],
        "outputs": [_describe(v) for v in model.graph.output],
    }


def _describe(v) -> dict:
    t = v.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
    return {"name": v.name, "dtype": _DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}
