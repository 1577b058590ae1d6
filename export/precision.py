"""Reduced-precision variants of the exported FP32 graphs: INT8 for CPUs, FP16 for GPUs.

INT8 is dynamic quantization of the weight matmuls: weights int8 per output channel,
activations uint8 per call, so no calibration data is needed. On CPUs with VNNI or AMX the
matmuls run on the integer units (item-bench at full size on this project's Xeon: CLIP image
4.0x, cross K/V 4.0x, CLIP text 2.8x faster than FP32; docs/performance.md, full-cpu4.json). Attention's
activation-by-activation matmuls, LayerNorm and softmax stay FP32.

FP16 puts the precision in the graph itself (DESIGN.md section 5): weights and activations
FP16, with LayerNorm, softmax, reductions and the exponentials kept FP32 and the graph's
inputs and outputs left FP32, so a strongly-typed TensorRT build keeps exactly this.

BF16 writes no file: its variant is the FP32 graph run by OpenVINO in BF16 (`runtime/backends/openvino.py`),
for CPUs with AMX or AVX512-BF16, and is gated the same way on the exporting machine.
Precision "mixed" picks per graph among the gated INT8 and BF16 variants (`MIXED_ORDER`) and is
gated again as one chain (`choice.choose_mixed`).

Which variants a bundle uses is decided by the gates in `parity.py` (`choice.choose`).
"""

from __future__ import annotations

import logging
from pathlib import Path

# Graphs worth a variant: the big matmul stacks the runtime executes on every image.
# detector_text only builds the word bank at export; the two heads are a few kFLOP.
VARIANT_PARTS = ("captioner_vision", "captioner_cross_kv", "captioner_decoder", "detector_image", "clip_image", "clip_text")
# The decoder's K/V cache grows every step; on OpenVINO, 20 greedy steps of BLIP base took
# 1240 ms in BF16 against 496 ms on ONNX Runtime FP32 (timed ad hoc on this project's Xeon).
BF16_PARTS = tuple(p for p in VARIANT_PARTS if p != "captioner_decoder")

# Precision "mixed" (CPUs with AMX): per graph, the first of these whose chain gate took it.
# INT8 first: where both passed, INT8 ran faster at full size on this project's Xeon (item-bench,
# docs/performance.md, full-cpu4.json: CLIP image 1283 against 1582 ms, CLIP text 37 against 53, cross K/V
# 27 against 44). BF16 then adds the graphs that INT8's gates refused (there: the detector's image side).
MIXED_ORDER = ("int8", "bf16")
MIXED = {
    "rule": "each graph INT8 where INT8's chain gate took it, else BF16 where BF16's did, else FP32",
    "gated": "as one chain again; BF16 graphs are dropped until it passes",
    "needs": "the needs of bf16 (OpenVINO, AMX-BF16 or AVX512-BF16) when a BF16 graph is in the mix",
}

# Ops that overflow or lose too much in FP16 (the field's most common accuracy bug).
FP16_KEEP_FP32 = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceMax", "Pow", "Sqrt", "Exp",
                  "Log", "Erf")

METHODS = {
    "int8": {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, dynamic per call",
        "ops": ["MatMul", "Gemm"],
        "constant_weights_only": True,
        "fallback": "a graph that fails its own gate is tried again with its output projections FP32",
    },
    "fp16": {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "weights": "fp16",
        "activations": "fp16",
        "kept_fp32": list(FP16_KEEP_FP32),
        "graph_io": "fp32",
    },
    "bf16": {
        "tool": "OpenVINO CPU plugin, INFERENCE_PRECISION_HINT=bf16",
        "graph": "the FP32 graph itself, no new file",
        "weights": "stored fp16 (OpenVINO's weight compression), multiplied in bf16",
        "activations": "bf16 where OpenVINO's CPU plugin has a bf16 kernel, else fp32",
        "needs": "a CPU with AMX-BF16 or AVX512-BF16, and `pip install 'itemrt[openvino]'`",
    },
}


def variant_parts(precision: str) -> tuple[str, ...]:
    return BF16_PARTS if precision == "bf16" else VARIANT_PARTS


def variant_file(precision: str, name: str) -> str:
    """Bundle-relative path of a graph's `precision` variant."""
    return f"{name}.onnx" if precision == "bf16" else f"{precision}/{name}.onnx"


def convert(precision: str, src: Path, dst: Path, keep_fp32: tuple[str, ...] = ()) -> None:
    """Write the `precision` variant of `src`; `keep_fp32` names matmul nodes left in FP32.
    BF16 needs no conversion (its variant is `src`)."""
    if precision == "bf16":
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if precision == "int8":
        _int8(src, dst, keep_fp32)
    elif precision == "fp16":
        if keep_fp32:
            raise ValueError("FP16 variants keep ops, not nodes, in FP32")
        _fp16(src, dst)
    else:
        raise ValueError(f"no converter for {precision!r}; known: {sorted(METHODS)}")


def output_projections(src: Path) -> tuple[str, ...]:
    """The matmuls nearest to each graph output (the last projection on every path to it).

    INT8's second try keeps these FP32: a head that reads out a few numbers per token (OWL-ViT's
    logit shift, a box regressor) magnifies the trunk's quantization error least when its own
    weights stay exact, and it costs little, because these are a small share of the FLOPs.
    Returns () when that would leave nothing to quantize (a graph that is all projections)."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    producer = {t: n for n in graph.node for t in n.output}
    ops = set(METHODS["int8"]["ops"])
    keep, seen, stack = set(), set(), [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ops:
            keep.add(node.name)
        else:
            stack.extend(node.input)
    total = sum(n.op_type in ops for n in graph.node)
    return tuple(sorted(keep)) if len(keep) < total else ()


def _int8(src: Path, dst: Path, keep_fp32: tuple[str, ...] = ()) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    untie_matmul_weights(model)
    # ORT logs a "consider pre-processing" warning on every call; it is about static quantization.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    quantize_dynamic(
        model,  # the loaded graph, untied: read once, no temporary file
        dst,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,  # measured: more accurate and faster than reduce_range on AVX-512 VNNI/AMX
        op_types_to_quantize=list(METHODS["int8"]["ops"]),
        nodes_to_exclude=list(keep_fp32),
        extra_options={"MatMulConstBOnly": True},
    )


def untie_matmul_weights(model) -> int:
    """Give the matmuls their own copy of a weight that another op also reads; returns how many
    weights were untied.

    BLIP's decoder ties its LM head (a Gemm with transB) to the word embeddings (a Gather).
    onnxruntime 1.30's quantize_dynamic transposes such a Gemm weight in place, so the Gather
    then reads a [hidden, vocab] table and the graph no longer loads (seen on 1.30, not on
    1.32). Untied, the Gather keeps the FP32 table and the Gemm gets its own INT8 copy, which
    is what 1.32 writes anyway: the file is no larger."""
    ops = set(METHODS["int8"]["ops"])
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.node:
        for pos, name in enumerate(node.input):
            if name in inits:
                readers.setdefault(name, []).append((node, pos))
    untied = 0
    for name, users in readers.items():
        weight_of = [n for n, pos in users if n.op_type in ops and pos == 1]
        if not weight_of or len(weight_of) == len(users):
            continue
        copy = graph.initializer.add()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}~matmul"
        for node in weight_of:
            node.input[1] = copy.name
        untied += 1
    return untied


def _fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(convert_float_to_float16(
        onnx.load(str(src)), keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_KEEP_FP32]
    ))
    model.topological_sort()  # the converter appends its Casts last; ONNX wants producers first
    onnx.save(model.model, str(dst))
