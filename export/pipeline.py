"""`item export`: frozen models -> a verified bundle (ONNX graphs, tokenizers, word bank, head).

Every graph is exported and checked against its PyTorch original, each reduced-precision
variant with it (`choice.gate_variant`); then the whole runtime chain is checked against the
reference chain, and each precision's chain (`choice.choose`). All numbers go into the
manifest (`itemrt.schema.Manifest`). The bundle is written to a temporary folder and moved
into place only when everything passed.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import itemrt
import torch
from itemrt.backends import open_cpu
from itemrt.backends.openvino import require_bf16
from itemrt.bundle import FORMAT, FORMAT_VERSION, MANIFEST, seal
from itemrt.errors import ParityError, PathError
from itemrt.paths import writable_folder
from itemrt.runtime import Runtime
from itemrt.samples import images as sample_images
from itemrt.schema import (
    Captioner,
    Clip,
    Component,
    Detector,
    Head,
    Manifest,
    Parity,
    Words,
)
from itemrt.stages.captioner import DecodingSpec, cross_inputs
from itemrt.stages.images import load_image
from itemrt.stages.preprocess import preprocess
from itemrt.stages.recipe import recipe
from itemrt.stages.text import TokenizerSpec
from itemrt.stages.words import DEFAULT_VOCABULARY, PROBE_WORDS

from . import graphs
from .bank import bank_parity, build_bank
from .choice import choose, choose_mixed, default_precision, gate_variant
from .head import random_head, save_head
from .models import DEFAULT_SOURCES, Models, image_spec, load_models, resolve
from .onnx_io import export_onnx
from .parity import (
    CHAIN_PAIRS,
    FP32,
    REFERENCE,
    chain_parity,
    compare,
    compare_boxes,
    reference_cases,
    save_chain_pairs,
)
from .precision import variant_parts
from .random_init import random_checkpoints, size_config
from .reference import reference_for_bundle

DEFAULT_HEAD = {"hidden": [512, 128], "dropout": 0.1}


@dataclass(frozen=True)
class Settings:
    """What the runtime will do with the graphs, as `item export`'s options set it."""

    seed: int
    max_new_tokens: int
    max_objects: int
    det_threshold: float
    query_template: str
    word_template: str
    recipe_name: str
    precisions: tuple[str, ...]


def export_bundle(
    out: str | Path,
    *,
    sources: dict[str, str] | None = None,
    random_init: str | None = None,
    seed: int = 0,
    max_new_tokens: int = 20,
    max_objects: int = 4,
    det_threshold: float = 0.1,
    query_template: str = "a photo of a {}",
    word_template: str = "a photo of a {}",
    recipe_name: str = "item-v1",
    precisions: tuple[str, ...] = ("int8",),
    parity_images: list[str | Path] | None = None,
    command: str | None = None,
    progress=print,
) -> Path:
    out = Path(out)
    t_start = time.perf_counter()
    _check_out(out)  # before the long work, not at its end
    if "bf16" in precisions:  # its gate runs here, on this CPU: say so before the long export
        require_bf16()
    if random_init:
        srcs = random_checkpoints(random_init, seed, progress)
        head_cfg = size_config(random_init)["head"]
    else:
        wanted = {**DEFAULT_SOURCES, **(sources or {})}
        srcs = {k: resolve(v) for k, v in wanted.items()}
        head_cfg = DEFAULT_HEAD
    models = load_models(srcs, progress)
    images = [load_image(p) for p in (parity_images or sample_images())]
    if len(images) < 2:
        raise ValueError("parity needs at least two images")
    settings = Settings(seed, max_new_tokens, max_objects, det_threshold, query_template, word_template, recipe_name,
                        tuple(precisions))

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        manifest = _write_bundle(tmp, models, images, head_cfg, settings, progress)
        manifest.name, manifest.random_init = out.name, random_init  # the folder is renamed to `out` at the end
        manifest.export_command = command or f"item export --out {out}"
        seal(tmp, manifest)

        progress("parity: runtime chain (ONNX Runtime) against the PyTorch reference chain")
        reference = reference_for_bundle(tmp, models)
        cases = reference_cases(reference, images, list(PROBE_WORDS[:max_objects]))
        with Runtime(tmp, precision="fp32", verify=False) as rt:
            chain = chain_parity(rt, cases, FP32)
        manifest.parity.chain = chain.report
        seal(tmp, manifest)
        if not chain.passed:
            raise ParityError(f"the runtime chain does not match the reference: {json.dumps(chain.report['summary'])}")
        pairs = {REFERENCE: [c.ref.pairs for c in cases], "fp32": chain.pairs}
        for precision in precisions:
            if (chosen := choose(tmp, manifest, precision, cases, progress)) is not None:
                pairs[precision] = chosen.pairs
        if (mixed := choose_mixed(tmp, manifest, cases, progress)) is not None:
            pairs["mixed"] = mixed.pairs
        save_chain_pairs(tmp / CHAIN_PAIRS, pairs)
        manifest.default_precision = default_precision(manifest.to_dict())
        manifest.export_seconds = round(time.perf_counter() - t_start, 1)
        seal(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"bundle written to {out} in {time.perf_counter() - t_start:.1f}s")
    return out


def _check_out(out: Path) -> None:
    """The bundle is written beside `out` and renamed into place at the end, replacing only an
    earlier bundle (or an empty folder): never a file or a folder of something else."""
    if out.exists():
        try:
            earlier = json.loads((out / MANIFEST).read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            earlier = False
        if not (earlier or (out.is_dir() and not any(out.iterdir()))):
            raise PathError(f"{out} exists and is not a bundle: give another --out, or move it away")
    writable_folder(out.parent)


def _versions() -> dict:
    import onnx
    import onnxruntime
    import tokenizers
    import transformers

    return {
        "itemrt": itemrt.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _write_bundle(root: Path, m: Models, images, head_cfg: dict, opt: Settings, progress: Callable[[str], None]) -> Manifest:
    """Export and gate the nine graphs, save the tokenizers, vocabulary, word bank and head;
    returns the manifest, still without the chain gates and the files' hashes."""
    components: dict[str, Component] = {}
    specs = {
        "captioner": image_spec(m.blip_processor),
        "detector": image_spec(m.owl_processor),
        "clip": image_spec(m.clip_processor),
    }
    px = {k: torch.from_numpy(x) for k, x in zip(specs, preprocess([(images, s) for s in specs.values()]))}
    steps = 9
    n = iter(range(1, steps + 1))

    def build(name, module, args, ins, outs, axes, check_inputs):
        """Export one graph, gate it and its variants against `module` on `check_inputs`."""
        i = next(n)
        progress(f"[{i}/{steps}] {name}: export")
        t0 = time.perf_counter()
        entry = export_onnx(module, args, root / f"{name}.onnx", ins, outs, axes)
        sess = open_cpu(root / entry["file"], name, "fp32")
        with torch.no_grad():
            ref = module(*check_inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run({k: v.numpy() for k, v in zip(ins, check_inputs)})
        parity = {o: (compare_boxes if o == "pred_boxes" else compare)(r.numpy(), got[o]) for o, r in zip(outs, ref)}
        parity["reference"] = "PyTorch module on the bundle's parity images"
        comp = Component(**entry, parity=parity, seconds=round(time.perf_counter() - t0, 1))
        bad = [o for o in outs if not parity[o]["passed"]]
        progress(f"[{i}/{steps}] {name}: {comp.seconds}s, parity " + ("ok" if not bad else f"FAILED on {bad}"))
        if bad:
            raise ParityError(f"{name}: ONNX output {bad} differs from PyTorch: {parity}")
        for precision in (p for p in opt.precisions if name in variant_parts(p)):
            v = comp.variants[precision] = gate_variant(root, name, precision, ins, outs, check_inputs, ref)
            progress(f"[{i}/{steps}] {name}: {precision} {v.seconds}s, gate " + ("ok" if v.passed else f"FAILED {v.error or ''}".rstrip()))
        components[name] = comp
        return ref

    batch = {0: "batch"}
    # --- captioner
    tc = m.blip.config.text_config
    layers, heads = tc.num_hidden_layers, tc.num_attention_heads
    head_dim = tc.hidden_size // heads
    (emb,) = build("captioner_vision", graphs.BlipVision(m.blip), (px["captioner"][:2],), ["pixel_values"],
                   ["image_embeds"], {"pixel_values": batch, "image_embeds": batch}, (px["captioner"],))
    ck, cv = build("captioner_cross_kv", graphs.BlipCrossKV(m.blip), (emb[:2],), ["image_embeds"],
                   ["cross_k", "cross_v"], {"image_embeds": batch, "cross_k": {1: "batch"}, "cross_v": {1: "batch"}}, (emb,))
    b = emb.shape[0]
    gen = torch.Generator().manual_seed(0)
    trace_past = torch.randn(layers, 2, 2, heads, 3, head_dim, generator=gen)
    check_past = torch.randn(layers, 2, b, heads, 5, head_dim, generator=gen)
    ids = torch.full((b, 1), tc.bos_token_id, dtype=torch.long)
    kv_axes = {2: "batch", 4: "past"}
    cross = cross_inputs(layers)  # per layer: views of ck / cv, as the runtime feeds them
    build("captioner_decoder", graphs.BlipDecoderStep(m.blip),
          (ids[:2], trace_past, *ck[:, :2], *cv[:, :2]),
          ["input_ids", "past_kv", *cross], ["logits", "present_kv"],
          {"input_ids": {0: "batch", 1: "tokens"}, "past_kv": kv_axes, **{c: batch for c in cross},
           "logits": batch, "present_kv": {2: "batch", 4: "total"}},
          (ids, check_past, *ck, *cv))

    # --- detector
    owl_out = build("detector_image", graphs.OwlImage(m.owl), (px["detector"][:2],), ["pixel_values"],
                    ["class_embeds", "logit_shift", "logit_scale", "pred_boxes"],
                    {"pixel_values": batch, "class_embeds": batch, "logit_shift": batch, "logit_scale": batch,
                     "pred_boxes": batch}, (px["detector"],))
    qtexts = [opt.query_template.format(w) for w in ("dog", "traffic light", "person")]
    q = m.owl_tokenizer(qtexts, padding="max_length", return_tensors="pt")
    # any length: the word bank pads to the longest query of a batch (export/bank.py)
    (queries,) = build("detector_text", graphs.OwlText(m.owl), (q["input_ids"], q["attention_mask"]),
                       ["input_ids", "attention_mask"], ["query_embeds"],
                       {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                        "query_embeds": batch},
                       (q["input_ids"], q["attention_mask"]))
    qb = queries[None].expand(b, -1, -1).contiguous()
    build("detector_head", graphs.OwlHead(), (*(t[:2] for t in owl_out[:3]), qb[:2]),
          ["class_embeds", "logit_shift", "logit_scale", "query_embeds"], ["logits"],
          {"class_embeds": batch, "logit_shift": batch, "logit_scale": batch,
           "query_embeds": {0: "batch", 1: "queries"}, "logits": {0: "batch", 2: "queries"}},
          (*owl_out[:3], qb))

    # --- CLIP
    (img_emb,) = build("clip_image", graphs.ClipImage(m.clip), (px["clip"][:2],), ["pixel_values"],
                       ["image_embeds"], {"pixel_values": batch, "image_embeds": batch}, (px["clip"],))
    t = m.clip_tokenizer(["a dog on a red couch next to a lamp", "a photo of a cat"], padding=True, return_tensors="pt")
    seq = {0: "batch", 1: "sequence"}
    build("clip_text", graphs.ClipText(m.clip), (t["input_ids"], t["attention_mask"]),
          ["input_ids", "attention_mask"], ["text_embeds"],
          {"input_ids": seq, "attention_mask": seq, "text_embeds": batch}, (t["input_ids"], t["attention_mask"]))

    # --- head (seeded, untrained until `item train`)
    _, feature_dim = recipe(opt.recipe_name)
    in_dim = feature_dim(img_emb.shape[-1])
    head = random_head(in_dim, head_cfg["hidden"], head_cfg["dropout"], opt.seed)
    feats = torch.randn(4, in_dim, generator=gen)
    build("head", head, (feats[:2],), ["features"], ["p_fake"], {"features": batch, "p_fake": batch}, (feats,))
    save_head(head, root / "head.safetensors")  # for the reference chain and for training

    # --- tokenizers, vocabulary, word bank
    toks = _save_tokenizers(root, m)
    captioner = Captioner(
        preprocess=specs["captioner"],
        tokenizer=toks["captioner"],
        decoding=DecodingSpec(
            bos_id=int(tc.bos_token_id), eos_id=int(tc.sep_token_id), pad_id=int(tc.pad_token_id),
            max_new_tokens=opt.max_new_tokens, layers=layers, heads=heads, head_dim=head_dim, strategy="greedy",
        ),
    )
    detector = Detector(
        preprocess=specs["detector"], tokenizer=toks["detector"], threshold=opt.det_threshold,
        query_template=opt.query_template,
    )
    clip = Clip(preprocess=specs["clip"], tokenizer=toks["clip"], word_template=opt.word_template, dim=int(img_emb.shape[-1]))
    words = Words(vocabulary="vocabulary.json", bank="bank.npz", max_objects=opt.max_objects)
    shutil.copy(DEFAULT_VOCABULARY, root / words.vocabulary)
    progress("word bank: CLIP and detector text embeddings of every vocabulary word")
    bank = build_bank(root, words, detector, clip, progress)

    return Manifest(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        itemrt_version=itemrt.__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        versions={**_versions(), "opset": components["head"].opset},
        platform={"machine": platform.machine(), "system": platform.system(), "argv": sys.argv[:1]},
        components=components,
        captioner=captioner,
        detector=detector,
        clip=clip,
        words=words,
        head=Head(
            trained=False,
            note="seeded random placeholder: p(fake) is meaningless until `item train`",
            recipe=opt.recipe_name,
            threshold=0.5,
            seed=opt.seed,
            weights="head.safetensors",
            **head.spec,
        ),
        parity=Parity(word_bank=bank_parity(m, bank, detector, clip)),
        name=root.name,  # the temporary folder's, until the caller names the bundle
        sources={k: s.to_dict() for k, s in m.sources.items()},
        files={},  # hashed by `seal`
    )


def _save_tokenizers(root: Path, m: Models) -> dict[str, TokenizerSpec]:
    """Each model's tokenizer as a tokenizers JSON, padded the way its reference processor pads."""
    (root / "tokenizers").mkdir(exist_ok=True)
    specs = {}
    for kind, tok, padding in (
        ("captioner", m.blip_tokenizer, "longest"),
        ("detector", m.owl_tokenizer, "max_length"),
        ("clip", m.clip_tokenizer, "longest"),
    ):
        rel = f"tokenizers/{kind}.json"
        tok.backend_tokenizer.save(str(root / rel))
        max_len = int(min(tok.model_max_length, 4096))
        specs[kind] = TokenizerSpec(rel, max_len, int(tok.pad_token_id), padding)
    return specs
