"""The contract: the ONNX Runtime chain matches the PyTorch reference chain (docs/design.md §6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import need_precision
from itemrt.export.parity import FP32, REDUCED, chain_parity, reference_cases
from itemrt.export.reference import reference_for_bundle
from itemrt.stages.images import load_image
from PIL import Image


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    return reference_for_bundle(tiny_bundle)


def _test_images(samples):
    rng = np.random.default_rng(7)
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 160), (300, 120))]
    return [load_image(p) for p in samples] + noise


def test_runtime_matches_reference_chain(runtime, reference, samples):
    report = chain_parity(runtime, reference_cases(reference, _test_images(samples), ["dog", "car"])).report
    s = report["summary"]
    assert s["images"] == 12
    assert s["tokens_total"] > 0 and s["words_total"] > 0 and s["found_total"] > 0, "chain not exercised"
    for row in report["images"]:
        assert row["tokens_equal"] and row["caption_equal"]
        assert row["words_equal"] and row["found_equal"]
        assert row["box_iou_min"] >= 0.99
        assert row["embed_cos_min"] >= 0.9999
        assert row["p_fake_abs_diff"] <= 1e-4
        assert row["decision_equal"]
    assert report["passed"]


def test_greedy_tokens_match_generate_directly(runtime, reference, samples):
    # independent of chain_parity: the HF generate output itself
    import torch

    m = reference.m
    for path in samples[:2]:
        img = load_image(path)
        px = m.blip_processor(img, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = m.blip.generate(pixel_values=px, do_sample=False, num_beams=1, max_new_tokens=20)
        ids = out[0, 1:].tolist()
        eos = m.blip.config.text_config.sep_token_id
        ids = ids[: ids.index(eos) + 1] if eos in ids else ids
        r = runtime.detect(img)
        assert r.caption_tokens == ids
        assert r.caption == m.blip_tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_decoder_reads_each_layers_cross_kv_in_place(runtime, samples):
    """One decoder input per layer, fed views of the cross-K/V graph's stacked outputs: a step
    copies no K/V (slicing a stacked input inside the graph copied 42 MB a step at full size)."""
    from itemrt.backends.base import HostSession
    from itemrt.stages.captioner import cross_inputs
    from itemrt.stages.preprocess import preprocess

    cap = runtime.captioner
    layers = cap.spec.layers
    assert list(cap.decoder.inputs) == ["input_ids", "past_kv", *cross_inputs(layers)]
    k, v = cap.cross_kv(cap.encode_image(preprocess([([load_image(samples[0])], runtime.specs["captioner"])])[0]))
    fed, decoder = [], cap.decoder

    class Recording(HostSession):  # the real session, with its feeds kept
        inputs, outputs, name = decoder.inputs, decoder.outputs, decoder.name

        def run(self, feeds, outputs=None):
            fed.append(feeds)
            return decoder.run(feeds, outputs)

    cap.decoder = Recording()
    try:
        (tokens,) = cap.generate(k, v, max_new_tokens=3).tokens
    finally:
        cap.decoder = decoder
    assert tokens == runtime.detect(samples[0], max_new_tokens=3).caption_tokens
    for feeds in fed:
        for i in range(layers):
            assert np.shares_memory(feeds[f"cross_k.{i}"], k) and np.array_equal(feeds[f"cross_k.{i}"], k[i])
            assert np.shares_memory(feeds[f"cross_v.{i}"], v) and np.array_equal(feeds[f"cross_v.{i}"], v[i])


def test_manifest_records_parity_of_every_component(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    for name, comp in m["components"].items():
        checks = [v for v in comp["parity"].values() if isinstance(v, dict)]
        assert checks, name
        for c in checks:
            assert c["passed"] and c["cos_min"] >= FP32.cos_min and c["rel"] <= 1e-4, (name, c)
    assert m["parity"]["chain"]["passed"]
    assert m["parity"]["word_bank"]["clip"]["cos_min"] >= FP32.cos_min
    assert m["parity"]["word_bank"]["detector"]["cos_min"] >= FP32.cos_min


def test_batch_equals_single(runtime, samples):
    single = [runtime.detect(p) for p in samples]
    batch = runtime.detect_batch(samples)
    for a, b in zip(single, batch):
        assert a.caption_tokens == b.caption_tokens
        assert [o.word for o in a.objects] == [o.word for o in b.objects]
        assert abs(a.p_fake - b.p_fake) < 1e-5
        assert abs(a.global_distance - b.global_distance) < 1e-5


def test_long_lists_run_in_passes_of_max_batch(tiny_bundle, runtime, samples):
    from itemrt import ImageError, Runtime

    images = samples[:4]
    with Runtime(tiny_bundle, precision="fp32", max_batch=3) as rt:
        split = rt.detect_batch(images)  # passes of 3 and 1
        with pytest.raises(ImageError, match="image 3"):  # named by its place in the caller's list
            rt.detect_batch([*images[:3], b"garbage"])
    for a, b in zip(runtime.detect_batch(images), split, strict=True):
        assert a.caption_tokens == b.caption_tokens and abs(a.p_fake - b.p_fake) < 1e-5
    assert split[0].timings_ms == split[2].timings_ms != split[3].timings_ms  # each pass its own
    with pytest.raises(ValueError, match="max_batch"):
        Runtime(tiny_bundle, max_batch=0)
    with pytest.raises(ValueError, match="threads"):  # checked before the bundle is even opened
        Runtime(tiny_bundle.parent / "no-such-bundle", threads=-1)


def test_result_fields(runtime, samples):
    r = runtime.detect(samples[0])
    assert 0.0 <= r.p_fake <= 1.0 and r.label in ("real", "fake")
    assert r.trained is False
    assert r.image_size == Image.open(samples[0]).size
    for stage in ("decode", "preprocess", "captioner_vision", "captioner_cross_kv", "captioner_decoder",
                  "detector_image", "detector_head", "crops", "clip_image", "clip_text", "head", "total"):
        assert r.timings_ms[stage] >= 0.0, stage
    found = [o for o in r.objects if o.found]
    for o in found:
        assert o.box is not None and o.distance is not None and 0.0 <= o.distance <= 2.0
    for o in r.objects:
        if not o.found:
            assert o.box is None and o.distance is None
    json.dumps(r.to_dict())  # serializable as is


def test_a_closed_runtime_says_so(tiny_bundle, samples):
    from itemrt import Runtime, RuntimeClosedError

    with Runtime(tiny_bundle) as rt:
        assert rt.detect(samples[0]).caption_tokens
    for call in (lambda: rt.detect(samples[0]), lambda: rt.detect_batch(samples[:2])):
        with pytest.raises(RuntimeClosedError, match="closed"):
            call()
    rt.close()  # closing twice is harmless


def test_caption_without_object_words(tiny_bundle, reference, samples):
    """No word matches: no boxes, no crops, only the global pair; both chains agree."""
    from itemrt import Runtime
    from itemrt.stages.words import Vocabulary

    nothing = Vocabulary(["zzzz"], {})
    with Runtime(tiny_bundle, precision="fp32") as rt:
        rt.vocabulary = nothing
        reference.vocabulary, saved = nothing, reference.vocabulary
        try:
            report = chain_parity(rt, reference_cases(reference, [load_image(p) for p in samples[:2]])).report
        finally:
            reference.vocabulary = saved
        r = rt.detect(samples[0])
    assert report["summary"]["words_total"] == 0 and report["passed"]
    assert r.objects == [] and 0.0 <= r.p_fake <= 1.0


def test_parallel_stages_give_the_same_results(tiny_bundle, runtime, samples):
    from itemrt import Runtime

    with Runtime(tiny_bundle, precision="fp32", parallel=True) as rt:
        par = rt.detect_batch(samples[:2])
    seq = runtime.detect_batch(samples[:2])
    for a, b in zip(par, seq):
        assert a.caption_tokens == b.caption_tokens and abs(a.p_fake - b.p_fake) < 1e-6


@pytest.mark.parametrize("precision", ["int8", "fp16", "bf16"])
def test_reduced_precision_graphs_are_gated_and_recorded(tiny_bundle, precision):
    need_precision(tiny_bundle, precision)
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    q = m["precisions"][precision]
    assert q["gates"] == REDUCED.to_dict() and q["attempts"], "the chain gate ran"
    variants = {n: c["variants"][precision] for n, c in m["components"].items() if precision in c.get("variants", {})}
    parts = {"captioner_vision", "captioner_cross_kv", "captioner_decoder", "detector_image", "clip_image", "clip_text"}
    assert set(variants) == (parts - {"captioner_decoder"} if precision == "bf16" else parts)
    for name, v in variants.items():
        assert all("cos_min" in p for p in v["parity"].values()), name
        assert v["used"] == (name in q["used"])
        if precision == "bf16":  # no file of its own: the FP32 graph, run by OpenVINO
            assert v["file"] == m["components"][name]["file"] and (tiny_bundle / v["file"]).is_file()
        else:
            assert (tiny_bundle / v["file"]).is_file() == v["used"], "unused variant files are not shipped"
        if v["used"]:
            assert v["passed"] and v["file"] in m["files"]
    if q["used"]:
        assert q["chain"]["passed"]
    assert m["default_precision"] == ("int8" if m["precisions"]["int8"]["used"] else "fp32")


def test_int8_second_try_keeps_output_projections_fp32(tiny_bundle, tmp_path):
    """OWL-ViT's image side: the trunk is quantized, the four read-out projections are not."""
    import onnx
    from itemrt.export.precision import convert, output_projections

    src = tiny_bundle / "detector_image.onnx"
    keep = output_projections(src)
    assert keep == ("/box_head/dense2/MatMul", "/dense0/MatMul", "/logit_scale/MatMul", "/logit_shift/MatMul")
    assert output_projections(tiny_bundle / "captioner_cross_kv.onnx") == ()  # all projections: no second try
    convert("int8", src, tmp_path / "d.onnx", keep_fp32=keep)
    nodes = {n.name: n.op_type for n in onnx.load(str(tmp_path / "d.onnx")).graph.node}
    assert all(nodes.get(k) == "MatMul" for k in keep)  # still float matmuls
    assert sum(op in ("MatMulInteger", "DynamicQuantizeMatMul") for op in nodes.values()) >= 8  # the trunk is int8
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    for c in m["components"].values():  # the manifest says what each variant kept, and every try when retried
        v = c.get("variants", {}).get("int8")
        if v:
            assert "kept_fp32" in v and (v["kept_fp32"] == [] or len(v["attempts"]) == 2)


def test_int8_unties_the_lm_head_from_the_word_embeddings(tiny_bundle, tmp_path):
    """BLIP's decoder reads one table in a Gather (embeddings) and a Gemm (LM head). onnxruntime
    1.30's quantizer transposed it in place for the Gemm, leaving a graph that no longer loads;
    quantized here, the Gather keeps the FP32 table in its shape and the Gemm reads its own copy."""
    import onnx
    import onnxruntime as ort
    from itemrt.export.precision import convert, untie_matmul_weights

    src = tiny_bundle / "captioner_decoder.onnx"
    fp32 = onnx.load(str(src))
    table = next(n.input[0] for n in fp32.graph.node if n.op_type == "Gather" and "word_embeddings" in n.name)
    shape = next(tuple(i.dims) for i in fp32.graph.initializer if i.name == table)
    assert sum(table in n.input for n in fp32.graph.node) == 2  # tied in the exported graph
    assert untie_matmul_weights(fp32) == 1 and untie_matmul_weights(fp32) == 0
    assert untie_matmul_weights(onnx.load(str(tiny_bundle / "clip_text.onnx"))) == 0  # nothing shared there
    convert("int8", src, tmp_path / "dec.onnx")
    q = onnx.load(str(tmp_path / "dec.onnx"))
    assert [n.op_type for n in q.graph.node if table in n.input] == ["Gather"]
    assert next(tuple(i.dims) for i in q.graph.initializer if i.name == table) == shape
    ort.InferenceSession(str(tmp_path / "dec.onnx"), providers=["CPUExecutionProvider"])


def test_a_variant_that_does_not_load_fails_its_gate_not_the_export(tmp_path, monkeypatch, capsys, cache_dir):
    """A converter bug (here: the decoder's INT8 file written as garbage) keeps that part FP32,
    records the error in the manifest and in `item info`, and the bundle is still written."""
    from itemrt.cli import main as item
    from itemrt.export import choice, pipeline

    convert = choice.convert

    def broken_decoder(precision, src, dst, keep_fp32=()):
        convert(precision, src, dst, keep_fp32=keep_fp32)
        if src.stem == "captioner_decoder":
            dst.write_bytes(b"not an onnx graph")

    monkeypatch.setattr(choice, "convert", broken_decoder)
    out = pipeline.export_bundle(tmp_path / "b", random_init="tiny", seed=0, precisions=("int8",),
                                 progress=lambda msg: None)
    m = json.loads((out / "manifest.json").read_text())
    v = m["components"]["captioner_decoder"]["variants"]["int8"]
    assert v["passed"] is False and v["used"] is False and v["reason"] == "own gate failed"
    assert "captioner_decoder" in v["error"] and v["parity"] == {} and "attempts" not in v  # no second try
    assert not (out / v["file"]).exists() and "captioner_decoder" not in m["precisions"]["int8"]["used"]
    assert item(["info", str(out)]) == 0
    assert "not used: own gate failed: BundleError" in capsys.readouterr().out


def test_fp16_graph_keeps_fp32_islands(tiny_bundle):
    """The precision is in the graph: FP16 weights, LayerNorm and softmax still FP32."""
    import onnx
    from itemrt.export.precision import FP16_KEEP_FP32

    m = json.loads((tiny_bundle / "manifest.json").read_text())
    name = next(n for n, c in m["components"].items() if "fp16" in c.get("variants", {}))
    path = tiny_bundle / m["components"][name]["variants"]["fp16"]["file"]
    if not path.is_file():
        pytest.skip(f"{name}'s fp16 graph did not pass its gate")
    g = onnx.load(str(path)).graph
    dtypes = {i.data_type for i in g.initializer if len(i.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in dtypes
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in g.input if "pixel" in i.name)
    kept = [n for n in g.node if n.op_type in FP16_KEEP_FP32]
    assert kept, "LayerNorm / softmax present"
    fp16_out = {n.output[0] for n in g.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16}
    assert not any(x in fp16_out for n in kept for x in n.input), "an FP32-kept op reads FP16"


@pytest.mark.parametrize("precision", ["int8", "fp16", "bf16", "mixed"])
def test_reduced_runtime_keeps_the_reference_decisions(tiny_bundle, reference, samples, precision):
    """Independent of the export's own check: the chain on fresh inputs keeps tokens, words
    and decisions of the PyTorch reference, and says which graphs ran in which precision."""
    from itemrt import Runtime

    need_precision(tiny_bundle, precision)
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    used = m["precisions"][precision]["used"]
    if not used:
        pytest.skip(f"no {precision} graph passed its gate for the tiny random-weight models")
    expected = used if precision == "mixed" else dict.fromkeys(used, precision)  # mixed: graph -> precision
    with Runtime(tiny_bundle, precision=precision) as rt:
        assert {n: p for n, p in rt.precisions.items() if p != "fp32"} == expected
        cases = reference_cases(reference, [load_image(p) for p in samples], ["cup", "person"])
        report = chain_parity(rt, cases, REDUCED).report
    s = report["summary"]
    assert s["tokens_equal"] and s["words_equal"] and s["decisions_equal"], s
    assert s["embed_cos_min"] >= REDUCED.cos_min, s


def test_mixed_takes_int8_then_bf16_and_is_gated_as_one_chain(tiny_bundle):
    """Precision mixed: every graph INT8's chain gate took, plus the graphs only BF16's took;
    recorded with its own chain gate; the runtime runs each graph in its recorded precision."""
    from itemrt import Runtime
    from itemrt.backends.openvino import OvSession
    from itemrt.bundle import Bundle

    need_precision(tiny_bundle, "bf16")
    q = json.loads((tiny_bundle / "manifest.json").read_text())["precisions"]
    proposed = dict.fromkeys(q["int8"]["used"], "int8")
    proposed.update({n: "bf16" for n in q["bf16"]["used"] if n not in proposed})
    if set(proposed.values()) != {"int8", "bf16"}:
        assert "mixed" not in q  # the same graphs as one precision alone: no mix of its own
        pytest.skip(f"the gates left no mix on the tiny models: {proposed}")
    mixed = q["mixed"]
    assert mixed["attempts"][0]["components"] == proposed and mixed["gates"] == REDUCED.to_dict()
    used = mixed["used"]
    if not used:
        assert "mixed" not in Bundle.open(tiny_bundle).precisions()
        pytest.skip("the mixed chain failed its gate on the tiny models")
    assert mixed["chain"]["passed"]
    assert {n for n, p in used.items() if p == "int8"} == set(q["int8"]["used"])  # INT8's graphs all stay
    assert {n for n, p in used.items() if p == "bf16"} <= set(q["bf16"]["used"]) - set(q["int8"]["used"])
    with Runtime(tiny_bundle, precision="mixed") as rt:
        assert "mixed" in Bundle.open(tiny_bundle).precisions()
        for name, p in used.items():
            assert rt.precisions[name] == p and isinstance(rt.sessions[name], OvSession) == (p == "bf16")


def test_precision_is_checked(tiny_bundle):
    from itemrt import Runtime

    with pytest.raises(ValueError, match="precision"):
        Runtime(tiny_bundle, precision="fp8")


def test_reference_chain_in_fp16(tiny_bundle, samples):
    """The GPU baseline (item-bench reference-cuda-fp16) moves the models and every input to a
    device and dtype; the same code path runs here on the CPU in FP16 and must keep the chain."""
    import torch
    from itemrt.stages.words import PROBE_WORDS

    ref = reference_for_bundle(tiny_bundle)  # its own copy of the models: the module fixture stays FP32
    img = load_image(samples[0])
    a = ref.run(img, words=list(PROBE_WORDS[:2]))
    b = ref.to("cpu", torch.float16).run(img, words=list(PROBE_WORDS[:2]))
    assert next(ref.m.clip.parameters()).dtype == torch.float16
    assert b.tokens == a.tokens and b.found == a.found and b.image_embeds.dtype == np.float32
    norms = np.linalg.norm(a.image_embeds, axis=-1) * np.linalg.norm(b.image_embeds, axis=-1)
    cos = np.sum(a.image_embeds * b.image_embeds, -1) / norms
    assert cos.min() >= 0.999
    assert (a.p_fake >= 0.5) == (b.p_fake >= 0.5)


@pytest.mark.parametrize(("failed", "blamed"), [
    ({"tokens_equal": False, "words_equal": False}, {"captioner_vision", "captioner_cross_kv", "captioner_decoder"}),
    ({"words_equal": False}, {"captioner_vision", "captioner_cross_kv", "captioner_decoder", "detector_image"}),
    ({"box_iou_min": 0.5}, {"detector_image"}),
    ({"embed_cos_min": 0.99}, {"detector_image", "clip_image", "clip_text"}),
    ({"decisions_equal": False}, {"captioner_vision", "captioner_cross_kv", "captioner_decoder", "detector_image",
                                  "clip_image", "clip_text"}),
])
def test_chain_gate_blames_only_graphs_that_can_break_the_failed_check(failed, blamed):
    """Shrinking a failed reduced-precision chain drops a graph that can cause the failure:
    at full size, bf16 tokens flipped, and dropping CLIP graphs for it would lose the speed."""
    from itemrt.export.parity import suspects

    ok = {"tokens_equal": True, "words_equal": True, "box_iou_min": 1.0, "embed_cos_min": 1.0,
          "decisions_equal": True, "p_fake_abs_diff_max": 0.0}
    assert set(suspects({**ok, **failed}, REDUCED)) == blamed
