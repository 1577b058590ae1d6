"""Random-weight checkpoints of the real architectures, from the JSON configs in configs/.

They are saved as ordinary Hugging Face folders (config, safetensors, tokenizer, processor)
so the same loading code reads them as it reads a user's weights. Tokenizers are
synthesized (a WordPiece vocabulary for BLIP, a CLIP-style byte-level BPE for OWL-ViT and
CLIP) at the configured vocabulary size: nothing is downloaded. `random_checkpoints` keeps
them in itemrt's cache, one folder per size and seed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from itemrt.bundle import cache_dir
from itemrt.stages.words import DEFAULT_VOCABULARY, plural_forms

from .models import DEFAULT_SOURCES, Source

CONFIG_DIR = Path(__file__).with_name("configs")
SIZES = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))

_CAPTION_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "is", "are", "at", "to", "by", "near", "next", "front", "top", "side", "two", "three", "four", "some", "sitting", "standing", "riding", "holding", "walking", "playing", "lying", "parked", "flying", "eating", "looking", "white", "black", "red", "blue", "green", "yellow", "brown", "large", "small", "old", "young", "wooden"]


def random_checkpoints(size: str, seed: int, progress=print) -> dict[str, Source]:
    """Random-init folders, cached per size, seed and what they are made from (building the full
    size takes a while; a new config or vocabulary must not reuse tokenizers made for the old)."""
    made_from = json.dumps([size_config(size), _corpus()], sort_keys=True).encode()
    root = cache_dir() / "random-init" / f"{size}-seed{seed}-{hashlib.sha256(made_from).hexdigest()[:12]}"
    if not (root / "done").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=root.parent if root.parent.exists() else None))
        build_random_checkpoints(size, tmp, seed, progress)
        (tmp / "done").write_text("ok\n")
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.move(str(tmp), root)
    return {k: Source(f"random-init:{size}", str(root / k), None) for k in DEFAULT_SOURCES}


def size_config(size: str) -> dict:
    path = CONFIG_DIR / f"{size}.json"
    if not path.is_file():
        raise ValueError(f"unknown random-init size {size!r}; known: {SIZES}")
    return json.loads(path.read_text())


def _corpus() -> list[str]:
    objects = json.loads(DEFAULT_VOCABULARY.read_text())["objects"]
    words = []
    for w in objects:
        words += w.split() + [p.split()[-1] for p in plural_forms(w)]
    return list(dict.fromkeys(_CAPTION_WORDS + words))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_bert_tokenizer(folder: Path, vocab_size: int) -> dict:
    """WordPiece vocabulary laid out like BLIP's: [PAD]=0 ... [DEC] (bos) near the end."""
    from transformers import BertTokenizer

    head = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tail = ["[DEC]", "[ENC]"]
    # as many corpus words as the vocabulary holds (a tiny model's captions name the first ones)
    words = _corpus()[: vocab_size - len(head) - len(tail)]
    filler = vocab_size - len(head) - len(tail) - len(words)
    vocab = head + words + [f"[unused{i}]" for i in range(filler)] + tail
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.model_max_length = 512
    tok.save_pretrained(folder)
    return {"pad_token_id": 0, "sep_token_id": 3, "bos_token_id": vocab.index("[DEC]"), "eos_token_id": 3}


def write_clip_tokenizer(folder: Path, vocab_size: int, max_length: int, pad_token: str) -> dict:
    """CLIP-style byte-level BPE with end-of-word '</w>'; merges spell out the corpus words."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    seen = set(vocab)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    for word in _corpus():  # whole words while they fit; the rest are spelt in smaller pieces
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        new, left = [], parts[0]
        for right in parts[1:]:
            if left + right not in seen and (left + right) not in {m[0] + m[1] for m in new}:
                new.append((left, right))
            left = left + right
        if len(vocab) + len(new) + len(specials) > vocab_size:
            break
        for left, right in new:
            seen.add(left + right)
            merges.append((left, right))
            vocab.append(left + right)
    filler = vocab_size - len(vocab) - len(specials)
    if filler < 0:
        raise ValueError(f"CLIP vocab_size {vocab_size} is too small for its {len(vocab)} byte-level tokens")
    vocab += [f"<|unused{i}|>" for i in range(filler)] + specials
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)
    tok.model_max_length = max_length
    tok.save_pretrained(folder)
    return {"bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1, "pad_token_id": tok.pad_token_id}


def build_random_checkpoints(size: str, out: Path, seed: int = 0, progress=print) -> dict[str, Path]:
    """Write captioner/, detector/, clip/ under `out`; returns their paths."""
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        CLIPConfig,
        CLIPModel,
        OwlViTConfig,
        OwlViTForObjectDetection,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import (
        OwlViTImageProcessorPil,
    )

    cfg = size_config(size)
    out = Path(out)
    paths = {k: out / k for k in ("captioner", "detector", "clip")}

    progress(f"random-init {size}: captioner (BLIP)")
    c = cfg["captioner"]
    ids = write_bert_tokenizer(paths["captioner"], c["vocab_size"])
    text_cfg = {**c["config"]["text_config"], "vocab_size": c["vocab_size"], **ids}
    torch.manual_seed(seed)
    blip = BlipForConditionalGeneration(BlipConfig(vision_config=c["config"]["vision_config"], text_config=text_cfg))
    blip.save_pretrained(paths["captioner"])
    s = c["image_size"]
    BlipImageProcessorPil(size={"height": s, "width": s}).save_pretrained(paths["captioner"])

    progress(f"random-init {size}: detector (OWL-ViT)")
    d = cfg["detector"]
    ids = write_clip_tokenizer(paths["detector"], d["vocab_size"], d["config"]["text_config"]["max_position_embeddings"], "!")
    torch.manual_seed(seed + 1)
    owl_cfg = OwlViTConfig(
        text_config={**d["config"]["text_config"], "vocab_size": d["vocab_size"], **ids},
        vision_config=d["config"]["vision_config"],
        projection_dim=d["config"]["projection_dim"],
    )
    owl = OwlViTForObjectDetection(owl_cfg)
    # transformers leaves the detection heads at a scale that saturates every box sigmoid
    # (raw outputs ~1e4 at full size): boxes become float noise. Trained heads are small.
    for module in (*owl.box_head.modules(), *owl.class_head.modules()):
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)
            torch.nn.init.zeros_(module.bias)
    owl.save_pretrained(paths["detector"])
    s = d["image_size"]
    OwlViTImageProcessorPil(size={"height": s, "width": s}, crop_size={"height": s, "width": s}).save_pretrained(paths["detector"])

    progress(f"random-init {size}: CLIP")
    k = cfg["clip"]
    ids = write_clip_tokenizer(paths["clip"], k["vocab_size"], 77, "<|endoftext|>")
    torch.manual_seed(seed + 2)
    clip_cfg = CLIPConfig(
        text_config={**k["config"]["text_config"], "vocab_size": k["vocab_size"], **ids},
        vision_config=k["config"]["vision_config"],
        projection_dim=k["config"]["projection_dim"],
    )
    CLIPModel(clip_cfg).save_pretrained(paths["clip"])
    s = k["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(paths["clip"])
    return paths
