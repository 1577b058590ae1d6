"""INT8 graphs for the CPU: dynamic quantization of the weight matmuls.

Weights become int8 per output channel; activations are quantized per call (uint8), so no
calibration data is needed. On CPUs with VNNI or AMX this runs the matmuls on the integer
units (item-bench at full size on this project's Xeon: CLIP image 4.0x, cross K/V 3.4x,
CLIP text 2.5x faster than FP32; README "Speed").
Attention's activation-by-activation matmuls, LayerNorm and softmax stay FP32.
Which quantized graphs a bundle uses is decided by the gates in `parity.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Graphs worth quantizing: the big matmul stacks the runtime executes on every image.
# detector_text only builds the word bank at export; the two heads are a few kFLOP.
INT8_PARTS = ("captioner_vision", "captioner_cross_kv", "captioner_decoder", "detector_image", "clip_image", "clip_text")

METHOD = {
    "tool": "onnxruntime.quantization.quantize_dynamic",
    "weights": "int8, symmetric, per output channel",
    "activations": "uint8, dynamic per call",
    "ops": ["MatMul", "Gemm"],
    "constant_weights_only": True,
}


def quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ORT logs a "consider pre-processing" warning on every call; it is about static quantization.
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        src,
        dst,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,  # measured: more accurate and faster than reduce_range on AVX-512 VNNI/AMX
        op_types_to_quantize=list(METHOD["ops"]),
        extra_options={"MatMulConstBOnly": True},
    )
