"""`item export`: frozen models -> a verified bundle (ONNX graphs, tokenizers, word bank, head).

Every graph is checked against its PyTorch original, then the whole runtime chain against
the reference chain; all numbers go into the manifest. The bundle is written to a
temporary folder and moved into place only when everything passed.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import itemrt
import numpy as np
import torch
from itemrt.backends.openvino import require_bf16
from itemrt.backends.ort import OrtSession, SessionOptions
from itemrt.bundle import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    cache_dir,
    sha256_file,
    write_manifest,
)
from itemrt.errors import ParityError, PathError
from itemrt.paths import writable_folder
from itemrt.runtime import Runtime, open_session
from itemrt.samples import images as sample_images
from itemrt.stages.captioner import cross_inputs
from itemrt.stages.images import load_image
from itemrt.stages.preprocess import preprocess
from itemrt.stages.recipe import recipe
from itemrt.stages.text import TextTokenizer, TextTower, TokenizerSpec
from itemrt.stages.words import DEFAULT_VOCABULARY, PROBE_WORDS, Vocabulary

from . import graphs
from .head import random_head, save_head
from .models import DEFAULT_SOURCES, Models, Source, image_spec, load_models, resolve
from .onnx_io import export_onnx
from .parity import (
    CHAIN_PAIRS,
    FP32,
    REDUCED,
    REFERENCE,
    ChainParity,
    chain_parity,
    compare,
    compare_boxes,
    reference_cases,
    save_chain_pairs,
    suspects,
)
from .precision import (
    METHODS,
    MIXED,
    MIXED_ORDER,
    convert,
    output_projections,
    variant_file,
    variant_parts,
)
from .random_init import build_random_checkpoints, size_config
from .reference import reference_for_bundle

DEFAULT_HEAD = {"hidden": [512, 128], "dropout": 0.1}


def random_checkpoints(size: str, seed: int, progress=print) -> dict[str, Source]:
    """Random-init folders, cached per size and seed (building the full size takes a while)."""
    root = cache_dir() / "random-init" / f"{size}-seed{seed}"
    if not (root / "done").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=root.parent if root.parent.exists() else None))
        build_random_checkpoints(size, tmp, seed, progress)
        (tmp / "done").write_text("ok\n")
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.move(str(tmp), root)
    return {k: Source(f"random-init:{size}", str(root / k), None) for k in DEFAULT_SOURCES}


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

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        manifest = _write_bundle(
            tmp, models, images, head_cfg,
            seed=seed, max_new_tokens=max_new_tokens, max_objects=max_objects, det_threshold=det_threshold,
            query_template=query_template, word_template=word_template, recipe_name=recipe_name, precisions=tuple(precisions),
            progress=progress,
        )
        manifest.update(
            name=out.name,
            random_init=random_init,
            export_command=command or f"item export --out {out}",
            sources={k: s.to_dict() for k, s in srcs.items()},
        )
        _save_manifest(tmp, manifest)

        progress("parity: runtime chain (ONNX Runtime) against the PyTorch reference chain")
        reference = reference_for_bundle(tmp, models)
        cases = reference_cases(reference, images, list(PROBE_WORDS[:max_objects]))
        with Runtime(tmp, precision="fp32", verify=False) as rt:
            chain = chain_parity(rt, cases, FP32)
        manifest["parity"]["chain"] = chain.report
        _save_manifest(tmp, manifest)
        if not chain.passed:
            raise ParityError(f"the runtime chain does not match the reference: {json.dumps(chain.report['summary'])}")
        pairs = {REFERENCE: [c.ref.pairs for c in cases], "fp32": chain.pairs}
        for precision in precisions:
            if (chosen := _choose(tmp, manifest, precision, cases, progress)) is not None:
                pairs[precision] = chosen.pairs
        if (mixed := _choose_mixed(tmp, manifest, cases, progress)) is not None:
            pairs["mixed"] = mixed.pairs
        save_chain_pairs(tmp / CHAIN_PAIRS, pairs)
        manifest["default_precision"] = default_precision(manifest)
        manifest["export_seconds"] = round(time.perf_counter() - t_start, 1)
        _save_manifest(tmp, manifest)
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


def _save_manifest(root: Path, manifest: dict) -> None:
    files = {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_manifest(root, {**manifest, "files": files})


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


def _write_bundle(root: Path, m: Models, images, head_cfg: dict, *, progress, **opt) -> dict:
    components: dict[str, dict] = {}
    specs = {
        "captioner": image_spec(m.blip_processor),
        "detector": image_spec(m.owl_processor),
        "clip": image_spec(m.clip_processor),
    }
    px = {k: torch.from_numpy(x) for k, x in zip(specs, preprocess([(images, s) for s in specs.values()]))}
    steps = 9
    n = iter(range(1, steps + 1))

    def build(name, module, args, ins, outs, axes, check_inputs):
        i = next(n)
        progress(f"[{i}/{steps}] {name}: export")
        t0 = time.perf_counter()
        entry = export_onnx(module, args, root / f"{name}.onnx", ins, outs, axes)
        sess = open_session(root / entry["file"], name, "fp32")
        with torch.no_grad():
            ref = module(*check_inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run({k: v.numpy() for k, v in zip(ins, check_inputs)})
        entry["parity"] = {
            o: (compare_boxes if o == "pred_boxes" else compare)(r.numpy(), got[o]) for o, r in zip(outs, ref)
        }
        entry["parity"]["reference"] = "PyTorch module on the bundle's parity images"
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        bad = [o for o in outs if not entry["parity"][o]["passed"]]
        progress(f"[{i}/{steps}] {name}: {entry['seconds']}s, parity " + ("ok" if not bad else f"FAILED on {bad}"))
        if bad:
            raise ParityError(f"{name}: ONNX output {bad} differs from PyTorch: {entry['parity']}")
        for precision in (p for p in opt["precisions"] if name in variant_parts(p)):
            v = _variant(root, name, precision, ins, outs, check_inputs, ref)
            entry.setdefault("variants", {})[precision] = v
            progress(f"[{i}/{steps}] {name}: {precision} {v['seconds']}s, gate " + ("ok" if v["passed"] else f"FAILED {v.get('error', '')}".rstrip()))
        components[name] = entry
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
    qtexts = [opt["query_template"].format(w) for w in ("dog", "traffic light", "person")]
    q = m.owl_tokenizer(qtexts, padding="max_length", return_tensors="pt")
    (queries,) = build("detector_text", graphs.OwlText(m.owl), (q["input_ids"], q["attention_mask"]),
                       ["input_ids", "attention_mask"], ["query_embeds"],
                       {"input_ids": batch, "attention_mask": batch, "query_embeds": batch},
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
    _, feature_dim = recipe(opt["recipe_name"])
    in_dim = feature_dim(img_emb.shape[-1])
    head = random_head(in_dim, head_cfg["hidden"], head_cfg["dropout"], opt["seed"])
    feats = torch.randn(4, in_dim, generator=gen)
    build("head", head, (feats[:2],), ["features"], ["p_fake"], {"features": batch, "p_fake": batch}, (feats,))
    save_head(head, root / "head.safetensors")  # for the reference chain and for training

    # --- tokenizers, vocabulary, word bank
    tok_specs = {}
    for kind, tok, padding in (
        ("captioner", m.blip_tokenizer, "longest"),
        ("detector", m.owl_tokenizer, "max_length"),
        ("clip", m.clip_tokenizer, "longest"),
    ):
        rel = f"tokenizers/{kind}.json"
        (root / "tokenizers").mkdir(exist_ok=True)
        tok.backend_tokenizer.save(str(root / rel))
        max_len = int(min(tok.model_max_length, 4096))
        tok_specs[kind] = TokenizerSpec(rel, max_len, int(tok.pad_token_id), padding).__dict__
    shutil.copy(DEFAULT_VOCABULARY, root / "vocabulary.json")
    progress("word bank: CLIP and detector text embeddings of every vocabulary word")
    bank = _build_bank(root, tok_specs, opt["query_template"], opt["word_template"])
    bank_parity = _bank_parity(m, bank, opt["query_template"], opt["word_template"])

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "itemrt_version": itemrt.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {**_versions(), "opset": components["head"]["opset"]},
        "platform": {"machine": platform.machine(), "system": platform.system(), "argv": sys.argv[:1]},
        "components": components,
        "captioner": {
            "preprocess": specs["captioner"].to_dict(),
            "tokenizer": tok_specs["captioner"],
            "decoding": {
                "bos_id": int(tc.bos_token_id), "eos_id": int(tc.sep_token_id), "pad_id": int(tc.pad_token_id),
                "max_new_tokens": opt["max_new_tokens"], "layers": layers, "heads": heads, "head_dim": head_dim,
                "strategy": "greedy",
            },
        },
        "detector": {
            "preprocess": specs["detector"].to_dict(),
            "tokenizer": tok_specs["detector"],
            "threshold": opt["det_threshold"],
            "query_template": opt["query_template"],
        },
        "clip": {
            "preprocess": specs["clip"].to_dict(),
            "tokenizer": tok_specs["clip"],
            "word_template": opt["word_template"],
            "dim": int(img_emb.shape[-1]),
        },
        "words": {"vocabulary": "vocabulary.json", "bank": "bank.npz", "max_objects": opt["max_objects"]},
        "head": {
            "trained": False,
            "note": "seeded random placeholder: p(fake) is meaningless until `item train`",
            "recipe": opt["recipe_name"],
            "threshold": 0.5,
            "seed": opt["seed"],
            "weights": "head.safetensors",
            **head.spec,
        },
        "parity": {"word_bank": bank_parity},
    }


def _variant(root: Path, name: str, precision: str, ins, outs, check_inputs, ref) -> dict:
    """Convert one graph and gate it against the same PyTorch outputs as its FP32 graph.
    An INT8 graph that fails is tried once more with its output projections kept FP32."""
    t0 = time.perf_counter()
    rel = variant_file(precision, name)
    attempts = []

    def attempt(keep: tuple[str, ...]) -> dict:
        try:
            convert(precision, root / f"{name}.onnx", root / rel, keep_fp32=keep)
            sess = open_session(root / rel, name, precision)
            got = sess.run({k: v.numpy() for k, v in zip(ins, check_inputs)})
        except Exception as e:  # noqa: BLE001 - a converter or runtime bug fails this variant's gate, not the export
            attempts.append({"kept_fp32": list(keep), "parity": {}, "passed": False, "error": f"{type(e).__name__}: {e}"})
            return attempts[-1]
        parity = {
            o: (compare_boxes if o == "pred_boxes" else compare)(r.numpy(), got[o], REDUCED) for o, r in zip(outs, ref)
        }
        attempts.append({"kept_fp32": list(keep), "parity": parity, "passed": all(p["passed"] for p in parity.values())})
        return attempts[-1]

    last = attempt(())
    retry = not last["passed"] and "error" not in last and precision == "int8"
    if retry and (keep := output_projections(root / f"{name}.onnx")):
        last = attempt(keep)
    out = {
        "file": rel,
        "precision": precision,
        "kept_fp32": last["kept_fp32"],  # matmul nodes left in FP32 inside this variant
        "parity": last["parity"],
        "passed": last["passed"],
        "used": False,  # decided by the chain gate in `_choose`
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if "error" in last:
        out["error"] = last["error"]
    if len(attempts) > 1:
        out["attempts"] = attempts
    return out


def default_precision(manifest: dict) -> str:
    """INT8 where the chain gate let any INT8 graph through and, once a head is trained, that
    head still makes the reference's decisions on the INT8 chain; FP16 is for GPUs, never
    the CPU default."""
    used = manifest.get("precisions", {}).get("int8", {}).get("used")
    check = (manifest["head"].get("chain_check") or {}).get("int8", {})
    return "int8" if used and check.get("decisions_equal", True) else "fp32"


def _choose(root: Path, manifest: dict, precision: str, cases, progress) -> ChainParity | None:
    """Use the `precision` graphs whose chain keeps tokens, words, boxes and decisions.

    All graphs that passed their own gate are tried together; if the chain fails, each is
    tried alone, and the set of those that pass alone is shrunk until the chain passes. Each
    step drops the graph with the worst own-gate cosine among those that can break the check
    that failed (`parity.suspects`): changed tokens never cost the CLIP graphs. The bundle
    records every attempt; unused files are deleted. Returns the passing chain's parity (None
    when no graph is used).
    """
    comps = manifest["components"]
    variants = {n: c["variants"][precision] for n, c in comps.items() if precision in c.get("variants", {})}
    attempts = []

    def attempt(names: list[str]) -> ChainParity:
        for n, v in variants.items():
            v["used"] = n in names
        _save_manifest(root, manifest)
        with Runtime(root, precision=precision, verify=False) as rt:
            chain = chain_parity(rt, cases, REDUCED)
        attempts.append({"components": names, "passed": chain.passed, "summary": chain.report["summary"]})
        progress(f"{precision} chain with {names or 'none'}: " + ("ok" if chain.passed else "FAILED"))
        return chain

    def worst_cos(n: str) -> float:
        return min(p["cos_min"] for p in variants[n]["parity"].values())

    chosen = [n for n, v in variants.items() if v["passed"]]
    chain = attempt(chosen) if chosen else None
    if chain is not None and not chain.passed:
        together = chosen
        alone = {n: attempt([n]) for n in chosen}
        chosen = [n for n in chosen if alone[n].passed]
        if chosen != together:  # all passing alone: the failed first attempt already says so
            chain = alone[chosen[0]] if len(chosen) == 1 else attempt(chosen) if chosen else None
        while chain is not None and not chain.passed:
            blamed = [n for n in chosen if n in suspects(chain.report["summary"], REDUCED)] or chosen
            chosen.remove(min(blamed, key=worst_cos))
            chain = attempt(chosen) if chosen else None
    for n, v in variants.items():
        v["used"] = n in chosen
        if not v["used"]:
            v["reason"] = "own gate failed" if not v["passed"] else "chain gate failed with it"
            if v["file"] != comps[n]["file"]:  # a bf16 variant is the FP32 graph itself
                (root / v["file"]).unlink(missing_ok=True)
    manifest.setdefault("precisions", {})[precision] = {
        "method": METHODS[precision],
        "gates": REDUCED.to_dict(),
        "used": chosen,
        "chain": chain.report if chain else None,
        "attempts": attempts,
    }
    return chain


def _choose_mixed(root: Path, manifest: dict, cases, progress) -> ChainParity | None:
    """Precision "mixed": each graph in INT8 where INT8's chain gate took it, else in BF16 where
    BF16's took it, else FP32 (`precision.MIXED_ORDER`), gated again as one chain. Made only
    when both were exported and the mix differs from each. If the mixed chain fails, the
    BF16 graphs it added are dropped one at a time (worst own-gate cosine among the suspects
    first), as in `_choose`. Returns the passing chain's parity, or None."""
    q = manifest.get("precisions", {})
    if not all(p in q for p in MIXED_ORDER):
        return None
    mix: dict[str, str] = {}
    for p in MIXED_ORDER:
        mix.update({n: p for n in q[p]["used"] if n not in mix})
    added = [n for n, p in mix.items() if p != MIXED_ORDER[0]]
    if not added or len(added) == len(mix):  # the same graphs as BF16 or as INT8 alone
        return None
    attempts = []

    def attempt() -> ChainParity:
        q["mixed"] = {"used": dict(mix)}
        _save_manifest(root, manifest)
        with Runtime(root, precision="mixed", verify=False) as rt:
            chain = chain_parity(rt, cases, REDUCED)
        attempts.append({"components": dict(mix), "passed": chain.passed, "summary": chain.report["summary"]})
        progress(f"mixed chain with {mix}: " + ("ok" if chain.passed else "FAILED"))
        return chain

    def cos(n: str) -> float:
        return min(p["cos_min"] for p in manifest["components"][n]["variants"][mix[n]]["parity"].values())

    chain = attempt()
    while not chain.passed:
        blamed = [n for n in added if n in suspects(chain.report["summary"], REDUCED)] or added
        drop = min(blamed, key=cos)
        added.remove(drop)
        del mix[drop]
        if not added:  # back to INT8 alone: no mix of its own
            break
        chain = attempt()
    passed = chain.passed
    q["mixed"] = {
        "method": MIXED,
        "gates": REDUCED.to_dict(),
        "used": dict(mix) if passed else {},
        "chain": chain.report if passed else None,
        "attempts": attempts,
    }
    _save_manifest(root, manifest)
    return chain if passed else None


def _build_bank(root: Path, tok_specs: dict, query_template: str, word_template: str) -> dict[str, np.ndarray]:
    """Embeds the vocabulary with the exported graphs: the runtime reads exactly these numbers."""
    opts = SessionOptions()
    words = Vocabulary.load(root / "vocabulary.json").objects

    def tok(kind):
        spec = TokenizerSpec.from_dict(tok_specs[kind])
        return TextTokenizer(root / spec.file, spec)

    det = TextTower(OrtSession(root / "detector_text.onnx", "detector_text", opts), tok("detector"), "query_embeds")
    clip = TextTower(OrtSession(root / "clip_text.onnx", "clip_text", opts), tok("clip"), "text_embeds")
    chunks = [words[i : i + 64] for i in range(0, len(words), 64)]
    bank = {
        "words": np.asarray(words),
        "clip": np.concatenate([clip([word_template.format(w) for w in c]) for c in chunks]),
        "detector": np.concatenate([det([query_template.format(w) for w in c]) for c in chunks]),
    }
    np.savez(root / "bank.npz", **bank)
    return bank


@torch.no_grad()
def _bank_parity(m: Models, bank: dict, query_template: str, word_template: str) -> dict:
    """A spread of bank rows against the original text towers."""
    idx = np.linspace(0, len(bank["words"]) - 1, 16).astype(int)
    words = [str(bank["words"][i]) for i in idx]
    t = m.clip_tokenizer([word_template.format(w) for w in words], padding=True, return_tensors="pt")
    out = m.clip.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
    clip_ref = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
    q = m.owl_tokenizer([query_template.format(w) for w in words], padding="max_length", return_tensors="pt")
    det_ref = graphs.OwlText(m.owl)(q["input_ids"], q["attention_mask"]).numpy()
    return {
        "words_checked": len(words),
        "clip": compare(clip_ref, bank["clip"][idx]),
        "detector": compare(det_ref, bank["detector"][idx]),
    }
