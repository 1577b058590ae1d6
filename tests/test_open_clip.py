"""open_clip checkpoints: the converted CLIPModel must compute what the open_clip network computes.

open_clip cannot be imported here (it needs torchvision, which has no CPU build next to torch
2.13), so the ground truth is the network open_clip builds for a standard CLIP, written below
in its own terms: `nn.MultiheadAttention` blocks (whose packed q/k/v layout is PyTorch's, not
ours), `x @ proj` projections and argmax pooling over zero-padded tokens. Its state dict has
open_clip's names, and it is saved the way open_clip saves it.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from itemrt import UnsupportedModelError, WeightsNotFoundError
from itemrt.export.models import image_spec, resolve
from itemrt.export.open_clip import load_open_clip
from itemrt.export.random_init import write_clip_tokenizer

# OpenAI's release is TorchScript: the tests that write one trace a network (deprecated, and
# the tracer warns about the shape checks inside nn.MultiheadAttention; the trace is only saved).
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

VOCAB, CONTEXT, EMBED = 4096, 77, 24
VISION = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}
TEXT = {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, act: nn.Module):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=act, c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, act):
        super().__init__()
        self.resblocks = nn.ModuleList(Block(width, heads, act) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class Visual(nn.Module):
    def __init__(self, act, cfg: dict):
        super().__init__()
        w, p, s = cfg["width"], cfg["patch_size"], cfg["image_size"]
        self.conv1 = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn((s // p) ** 2 + 1, w) * w**-0.5)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg["layers"], w // cfg["head_width"], act)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, EMBED) * w**-0.5)

    def forward(self, px):
        x = self.conv1(px).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipNetwork(nn.Module):
    """open_clip's `CLIP` for a standard config: same parameter names, same forward."""

    def __init__(self, quick_gelu: bool, vision: dict = VISION, text: dict = TEXT):
        super().__init__()
        act = QuickGELU() if quick_gelu else nn.GELU()
        w = text["width"]
        self.visual = Visual(act, vision)
        self.transformer = Transformer(w, text["layers"], text["heads"], act)
        self.token_embedding = nn.Embedding(VOCAB, w)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, w) * 0.01)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.randn(w, EMBED) * w**-0.5)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def encode_image(self, px):
        return self.visual(px)

    def encode_text(self, ids):
        mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
        x = self.transformer(self.token_embedding(ids) + self.positional_embedding, mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection


def write_checkpoint(folder, net, quick_gelu, *, safetensors=False, model_cfg=None, extra=None):
    """A folder as open_clip writes it for the hub: config, weights, tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model_cfg or {"embed_dim": EMBED, "vision_cfg": VISION, "text_cfg": TEXT} | (
        {"quick_gelu": True} if quick_gelu else {})  # GELU as open_clip saves it: the key left out
    pp = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}))
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()} | (extra or {})
    if safetensors:
        from safetensors.torch import save_file

        save_file(sd, str(folder / "open_clip_model.safetensors"))
    else:  # a training checkpoint: wrapped and DDP-prefixed, as open_clip's loader accepts
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, folder / "open_clip_pytorch_model.bin")
    write_clip_tokenizer(folder, VOCAB, CONTEXT, "<|endoftext|>")
    return folder


def open_clip_tokens(tokenizer, texts):
    """open_clip's tokenize(): <sot> bpe <eot>, zero-padded to the context length."""
    out = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = tokenizer(t)["input_ids"]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


@pytest.mark.parametrize("quick_gelu,safetensors", [(True, False), (False, True)])
def test_converted_model_computes_what_open_clip_computes(tmp_path, quick_gelu, safetensors):
    torch.manual_seed(0)
    net = OpenClipNetwork(quick_gelu).eval()
    folder = write_checkpoint(tmp_path / "oc", net, quick_gelu, safetensors=safetensors)
    said = []
    model, tokenizer, processor = load_open_clip(folder, progress=said.append)
    assert any('"quick_gelu"' in m for m in said) != quick_gelu  # a config that does not say is flagged

    px = torch.randn(3, 3, 32, 32)
    texts = ["a dog on a red couch next to a lamp", "a photo of a cat", "two men riding horses"]
    with torch.no_grad():
        ref_img, ref_txt = net.encode_image(px), net.encode_text(open_clip_tokens(tokenizer, texts))
        img = model.get_image_features(pixel_values=px)
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    for ref, got in ((ref_img, img), (ref_txt, txt)):
        cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
        assert cos.min().item() > 0.99999, cos
        assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4)
    assert model.config.vision_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert torch.allclose(model.logit_scale, net.logit_scale)

    spec = image_spec(processor)  # open_clip's eval transform, as the runtime will run it
    assert (spec.resize, spec.shortest_edge, spec.crop_height, spec.crop_width) == ("shortest_edge", 32, 32, 32)
    assert spec.resample == "bicubic" and spec.mean == (0.5, 0.4, 0.3) and spec.std == (0.2, 0.25, 0.3)


def test_variants_that_are_another_network_are_refused(tmp_path):
    torch.manual_seed(0)
    net = OpenClipNetwork(True)
    cfg = {"embed_dim": EMBED, "vision_cfg": {**VISION, "ls_init_value": 1e-5}, "text_cfg": TEXT}
    with pytest.raises(UnsupportedModelError, match="ls_init_value"):
        load_open_clip(write_checkpoint(tmp_path / "ls", net, True, model_cfg=cfg))
    cfg = {"embed_dim": EMBED, "vision_cfg": VISION, "text_cfg": {**TEXT, "hf_model_name": "roberta-base"}}
    with pytest.raises(UnsupportedModelError, match="hf_model_name"):
        load_open_clip(write_checkpoint(tmp_path / "hf", net, True, model_cfg=cfg))
    # a tensor the standard network does not have (layer scale left out of the config)
    extra = {"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(VISION["width"])}
    with pytest.raises(UnsupportedModelError, match="ls_1.gamma"):
        load_open_clip(write_checkpoint(tmp_path / "extra", net, True, extra=extra))


def test_missing_tokenizer_or_weights_are_named(tmp_path):
    torch.manual_seed(0)
    folder = write_checkpoint(tmp_path / "oc", OpenClipNetwork(True), True)
    for f in ("tokenizer.json", "vocab.json"):
        (folder / f).unlink()
    with pytest.raises(WeightsNotFoundError, match="tokenizer"):
        load_open_clip(folder)
    folder = write_checkpoint(tmp_path / "oc2", OpenClipNetwork(True), True)
    weights = folder / "open_clip_pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(UnsupportedModelError, match="truncated"):
        load_open_clip(folder)
    weights.unlink()
    with pytest.raises(WeightsNotFoundError, match="open_clip_model.safetensors"):
        load_open_clip(folder)


def write_openai_archive(folder, net, name="ViT-T-8.pt"):
    """OpenAI's release: the network traced to TorchScript, weights in FP16, the ints that
    OpenAI's build_model reads kept as tensors, and no config; tokenizer files beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(net)  # a traced module shares the network's tensors; .half() below must not touch them
    for key, value in (("input_resolution", VISION["image_size"]), ("context_length", CONTEXT), ("vocab_size", VOCAB)):
        net.register_buffer(key, torch.tensor(value))
    ts = torch.jit.trace_module(
        net, {"encode_image": torch.randn(1, 3, 32, 32), "encode_text": torch.zeros(1, CONTEXT, dtype=torch.long)},
        check_trace=False,
    )
    ts.half().save(str(folder / name))
    write_clip_tokenizer(folder, VOCAB, CONTEXT, "<|endoftext|>")
    return folder / name


# OpenAI's build_model gives every tower 64-wide heads: widths of 128, two heads each.
OPENAI_VISION = {**VISION, "width": 128, "head_width": 64}
OPENAI_TEXT = {**TEXT, "width": 128, "heads": 2}


def test_openai_archive_computes_what_the_network_computes(tmp_path):
    torch.manual_seed(0)
    net = OpenClipNetwork(True, OPENAI_VISION, OPENAI_TEXT).half().float().eval()  # OpenAI ships FP16 weights
    archive = write_openai_archive(tmp_path / "openai", net)
    for spec in (archive, archive.parent):  # the file, or the folder that holds it
        assert resolve(str(spec)).to_dict()["format"] == "openai"
    from itemrt.export.open_clip import load_openai

    said = []
    model, tokenizer, processor = load_openai(archive, progress=said.append)
    assert model.config.vision_config.hidden_act == "quick_gelu"  # OpenAI's networks use QuickGELU
    px = torch.randn(3, 3, 32, 32)
    texts = ["a dog on a red couch next to a lamp", "a photo of a cat"]
    with torch.no_grad():
        ref_img, ref_txt = net.encode_image(px), net.encode_text(open_clip_tokens(tokenizer, texts))
        img = model.get_image_features(pixel_values=px)
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    for ref, got in ((ref_img, getattr(img, "pooler_output", img)), (ref_txt, getattr(txt, "pooler_output", txt))):
        assert torch.allclose(ref, got, atol=1e-4, rtol=1e-4)
    spec = image_spec(processor)  # OpenAI's preprocessing
    assert (spec.resize, spec.shortest_edge, spec.resample) == ("shortest_edge", 32, "bicubic")
    assert spec.mean == (0.48145466, 0.4578275, 0.40821073)


def test_openai_archive_errors_are_typed(tmp_path):
    torch.manual_seed(0)
    archive = write_openai_archive(tmp_path / "oa", OpenClipNetwork(True, OPENAI_VISION, OPENAI_TEXT).eval())
    from itemrt.export.open_clip import load_openai

    cut = tmp_path / "cut" / "ViT.pt"
    cut.parent.mkdir()
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(WeightsNotFoundError):  # a cut zip is not recognised as an archive at all
        resolve(str(cut.parent))
    for f in ("tokenizer.json", "vocab.json"):
        (archive.parent / f).unlink()
    with pytest.raises(WeightsNotFoundError, match="tokenizer"):
        load_openai(archive)
    other = tmp_path / "other" / "m.pt"
    other.parent.mkdir()
    torch.jit.trace(nn.Linear(4, 4), torch.randn(1, 4)).save(str(other))
    write_clip_tokenizer(other.parent, VOCAB, CONTEXT, "<|endoftext|>")
    with pytest.raises(UnsupportedModelError, match="not of an OpenAI CLIP"):
        load_openai(other)


@pytest.mark.parametrize("fmt", ["open_clip", "openai"])
def test_export_with_an_open_clip_clip_passes_parity(tmp_path, cache_dir, fmt):
    """The whole export (graphs, bank, gates, chain parity) with the CLIP side from open_clip,
    or from OpenAI's archive."""
    from itemrt import Runtime
    from itemrt.export.pipeline import export_bundle
    from itemrt.export.random_init import random_checkpoints

    torch.manual_seed(0)
    if fmt == "open_clip":
        folder = write_checkpoint(tmp_path / "oc", OpenClipNetwork(True), True, safetensors=True)
    else:
        folder = write_openai_archive(tmp_path / "oa", OpenClipNetwork(True, OPENAI_VISION, OPENAI_TEXT).eval()).parent
    assert resolve(str(folder)).path == str(folder.resolve())
    tiny = random_checkpoints("tiny", 0, progress=lambda m: None)
    out = export_bundle(
        tmp_path / "b",
        sources={"captioner": tiny["captioner"].path, "detector": tiny["detector"].path, "clip": str(folder)},
        precisions=(), progress=lambda m: None,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"]["clip"]["format"] == fmt
    assert manifest["parity"]["chain"]["passed"]
    with Runtime(out, precision="fp32") as rt:
        r = rt.detect(np.full((48, 40, 3), 128, np.uint8))
    assert 0.0 <= r.p_fake <= 1.0 and len(r.objects) <= manifest["words"]["max_objects"]
