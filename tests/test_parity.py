"""The contract: the ONNX Runtime chain matches the PyTorch reference chain (DESIGN.md section 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from itemrt.export.parity import COS_MIN, chain_parity
from itemrt.export.reference import reference_for_bundle
from itemrt.images import load_image


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    return reference_for_bundle(tiny_bundle)


def _test_images(samples):
    rng = np.random.default_rng(7)
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 160), (300, 120))]
    return [load_image(p) for p in samples] + noise


def test_runtime_matches_reference_chain(runtime, reference, samples):
    report = chain_parity(runtime, reference, _test_images(samples))
    s = report["summary"]
    assert s["images"] == 6
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


def test_manifest_records_parity_of_every_component(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    for name, comp in m["components"].items():
        checks = [v for v in comp["parity"].values() if isinstance(v, dict)]
        assert checks, name
        for c in checks:
            assert c["passed"] and c["cos_min"] >= COS_MIN and c["rel"] <= 1e-4, (name, c)
    assert m["parity"]["chain"]["passed"]
    assert m["parity"]["word_bank"]["clip"]["cos_min"] >= COS_MIN
    assert m["parity"]["word_bank"]["detector"]["cos_min"] >= COS_MIN


def test_batch_equals_single(runtime, samples):
    single = [runtime.detect(p) for p in samples]
    batch = runtime.detect_batch(samples)
    for a, b in zip(single, batch):
        assert a.caption_tokens == b.caption_tokens
        assert [o.word for o in a.objects] == [o.word for o in b.objects]
        assert abs(a.p_fake - b.p_fake) < 1e-5
        assert abs(a.global_distance - b.global_distance) < 1e-5


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


def test_caption_without_object_words(tiny_bundle, reference, samples):
    """No word matches: no boxes, no crops, only the global pair; both chains agree."""
    from itemrt import Runtime
    from itemrt.words import Vocabulary

    nothing = Vocabulary(["zzzz"], {})
    with Runtime(tiny_bundle) as rt:
        rt.vocabulary = nothing
        reference.vocabulary, saved = nothing, reference.vocabulary
        try:
            report = chain_parity(rt, reference, [load_image(p) for p in samples[:2]])
        finally:
            reference.vocabulary = saved
        r = rt.detect(samples[0])
    assert report["summary"]["words_total"] == 0 and report["passed"]
    assert r.objects == [] and 0.0 <= r.p_fake <= 1.0


def test_parallel_stages_give_the_same_results(tiny_bundle, runtime, samples):
    from itemrt import Runtime

    with Runtime(tiny_bundle, parallel=True) as rt:
        par = rt.detect_batch(samples[:2])
    seq = runtime.detect_batch(samples[:2])
    for a, b in zip(par, seq):
        assert a.caption_tokens == b.caption_tokens and abs(a.p_fake - b.p_fake) < 1e-6
