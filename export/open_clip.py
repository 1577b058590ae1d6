"""open_clip checkpoints as a CLIP source, converted to transformers' `CLIPModel` in memory.

open_clip itself cannot be the loader here: it imports torchvision, which has no CPU build
next to torch 2.13. The standard open_clip CLIP (and OpenAI's original layout, which open_clip
keeps) is the same network as `CLIPModel`: a ViT with a class token, pre/post LayerNorm and a
bias-free projection, and a causal text transformer pooled at the end-of-text token. So the
weights are renamed and `nn.MultiheadAttention`'s packed `in_proj` is split into q/k/v.
Variants that are a different network (layer scale, attentional pooling, timm or HF towers,
custom attention blocks, other pooling) are refused by name rather than converted wrongly,
and the state dict must match the expected key set exactly.

A folder is open_clip's when it holds `open_clip_config.json` (what open_clip writes next to
its weights: `model_cfg` and `preprocess_cfg`) and no transformers CLIP `config.json`.

OpenAI's own release (`ViT-L-14.pt`, what `clip.load` caches and open_clip's "openai" tag
loads) is a TorchScript archive of the same network in the same layout, given as the file or
as a folder that holds exactly one. Its tensors are read through `torch.jit.load`; the sizes
come from the tensors and the rest is what OpenAI's `build_model` fixes: QuickGELU, 64-wide
attention heads, and OpenAI's preprocessing (bicubic, shortest side, centre crop).
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

from itemrt.errors import UnsupportedModelError, WeightsNotFoundError

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # either makes AutoTokenizer work

# open_clip defaults for the options that change the network; a checkpoint that sets any of
# these to something else is not a CLIPModel.
_VISION_DEFAULTS = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "pool_type": "tok", "timm_model_name": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "act_kwargs": None,
}
_TEXT_DEFAULTS = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "pool_type": "argmax",
    "proj_bias": False, "proj_type": "linear", "hf_model_name": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "act_kwargs": None,
}
_INTERPOLATION = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL resample codes


# Ints OpenAI's archive carries as tensors next to the weights (OpenAI's build_model drops them).
_OPENAI_META = ("input_resolution", "context_length", "vocab_size")


def checkpoint_format(path: Path) -> str:
    """"openai", "open_clip" or "transformers": how a CLIP source is loaded."""
    if openai_archive(path) is not None:
        return "openai"
    return "open_clip" if is_open_clip_folder(path) else "transformers"


def openai_archive(path: Path) -> Path | None:
    """The OpenAI TorchScript archive `path` is, or the only one a model-less folder holds."""
    if path.is_file():
        return path if _is_torchscript(path) else None
    if path.is_dir() and not (path / "config.json").is_file() and not (path / CONFIG_NAME).is_file():
        found = [f for f in sorted(path.glob("*.pt")) if _is_torchscript(f)]
        return found[0] if len(found) == 1 else None
    return None


def _is_torchscript(f: Path) -> bool:
    try:
        with zipfile.ZipFile(f) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def is_open_clip_folder(path: Path) -> bool:
    if not (path / CONFIG_NAME).is_file():
        return False
    hf = path / "config.json"
    return not hf.is_file() or json.loads(hf.read_text()).get("model_type") != "clip"


def read_config(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from open_clip_config.json."""
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())
        return cfg["model_cfg"], cfg.get("preprocess_cfg", {})
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{path / CONFIG_NAME} is not an open_clip config ({e})") from None


def _check_options(model_cfg: dict) -> None:
    bad = []
    for side, defaults in (("vision_cfg", _VISION_DEFAULTS), ("text_cfg", _TEXT_DEFAULTS)):
        cfg = model_cfg.get(side, {})
        bad += [f"{side}.{k}={cfg[k]!r}" for k, v in defaults.items() if k in cfg and cfg[k] != v]
    if isinstance(model_cfg.get("vision_cfg", {}).get("layers"), (list, tuple)):
        bad.append("vision_cfg.layers is a list (ModifiedResNet)")
    if model_cfg.get("init_logit_bias") is not None:
        bad.append("init_logit_bias (SigLIP-style)")
    if bad:
        raise UnsupportedModelError(
            "this open_clip checkpoint is not a standard CLIP network and would not convert faithfully: "
            + ", ".join(bad) + ". Use a transformers CLIPModel folder for it instead"
        )


def load_state_dict(path: Path) -> dict:
    """The checkpoint's tensors, unwrapped as open_clip unwraps them (state_dict, module.)."""
    files = [path / n for n in WEIGHT_NAMES if (path / n).is_file()]
    if not files:
        raise WeightsNotFoundError(f"{path} has {CONFIG_NAME} but none of {', '.join(WEIGHT_NAMES)}")
    f = files[0]
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(f))
    else:
        import pickle

        import torch

        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)  # never unpickles code
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise UnsupportedModelError(
                f"{f} is not a plain state dict that loads without running code (a TorchScript archive or "
                f"a truncated file?): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise UnsupportedModelError(f"{f} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _layers(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def clip_config(model_cfg: dict, sd: dict, eos_token_id: int, bos_token_id: int, pad_token_id: int) -> dict:
    """CLIPConfig keyword arguments; sizes come from the tensors, the rest from model_cfg."""
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    v_width, _, patch, _ = sd["visual.conv1.weight"].shape
    t_width = sd["ln_final.weight"].shape[0]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision = {
        "hidden_size": v_width,
        "intermediate_size": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _layers(sd, "visual.transformer.resblocks."),
        "num_attention_heads": v_width // v.get("head_width", 64),
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": act,
        "layer_norm_eps": (v.get("norm_kwargs") or {}).get("eps", 1e-5),
    }
    text = {
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "hidden_size": t_width,
        "intermediate_size": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _layers(sd, "transformer.resblocks."),
        "num_attention_heads": t.get("heads", 8),
        "max_position_embeddings": sd["positional_embedding"].shape[0],
        "hidden_act": act,
        "layer_norm_eps": (t.get("norm_kwargs") or {}).get("eps", 1e-5),
        "eos_token_id": eos_token_id,
        "bos_token_id": bos_token_id,
        "pad_token_id": pad_token_id,
    }
    return {"vision_config": vision, "text_config": text, "projection_dim": sd["visual.proj"].shape[1]}


def _tower(sd: dict, src: str, dst: str, n: int) -> dict:
    """Rename one open_clip transformer's blocks to transformers' encoder layers."""
    out = {}
    for i in range(n):
        a, b = f"{src}.resblocks.{i}", f"{dst}.encoder.layers.{i}"
        q, k, v = sd[f"{a}.attn.in_proj_weight"].chunk(3, dim=0)  # nn.MultiheadAttention packs q, k, v
        qb, kb, vb = sd[f"{a}.attn.in_proj_bias"].chunk(3, dim=0)
        out |= {
            f"{b}.self_attn.q_proj.weight": q, f"{b}.self_attn.q_proj.bias": qb,
            f"{b}.self_attn.k_proj.weight": k, f"{b}.self_attn.k_proj.bias": kb,
            f"{b}.self_attn.v_proj.weight": v, f"{b}.self_attn.v_proj.bias": vb,
        }
        for old, new in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{b}.{new}.weight"] = sd[f"{a}.{old}.weight"]
            out[f"{b}.{new}.bias"] = sd[f"{a}.{old}.bias"]
    return out


def expected_keys(n_vision: int, n_text: int) -> set[str]:
    """Every tensor a standard open_clip CLIP state dict holds (and nothing else)."""
    block = ["attn.in_proj_weight", "attn.in_proj_bias"]  # nn.MultiheadAttention's own names
    block += [f"{p}.{s}" for p in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj") for s in ("weight", "bias")]
    keys = {f"visual.transformer.resblocks.{i}.{b}" for i in range(n_vision) for b in block}
    keys |= {f"transformer.resblocks.{i}.{b}" for i in range(n_text) for b in block}
    keys |= {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
             "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
             "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
             "text_projection", "logit_scale"}
    return keys


def convert_state_dict(sd: dict) -> dict:
    """open_clip (OpenAI layout) names -> transformers CLIPModel names."""
    n_v, n_t = _layers(sd, "visual.transformer.resblocks."), _layers(sd, "transformer.resblocks.")
    have, want = set(sd), expected_keys(n_v, n_t)
    if have != want:
        extra, missing = sorted(have - want), sorted(want - have)
        raise UnsupportedModelError(
            "the open_clip state dict is not a standard CLIP network: "
            f"unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}, missing {missing[:6]}"
        )
    out = _tower(sd, "visual.transformer", "vision_model", n_v) | _tower(sd, "transformer", "text_model", n_t)
    out |= {
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],  # sic: transformers' name
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T.contiguous(),  # open_clip computes x @ proj
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T.contiguous(),
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    return out


def image_processor(pp: dict, image_size: int):
    """open_clip's eval transform as the transformers processor the rest of the export reads."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    mode, interp = pp.get("resize_mode", "shortest"), pp.get("interpolation", "bicubic")
    if interp not in _INTERPOLATION:
        raise UnsupportedModelError(f"open_clip interpolation {interp!r} is not one of {sorted(_INTERPOLATION)}")
    size = pp.get("size", image_size)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UnsupportedModelError(f"open_clip preprocess size {size} is not square")
        size = size[0]
    common = {
        "resample": _INTERPOLATION[interp],
        "image_mean": list(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),  # open_clip's OpenAI defaults
        "image_std": list(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
    }
    if mode == "shortest":  # resize the short side, centre crop
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **common)
    if mode == "squash":  # resize to the square, no crop
        return CLIPImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False, **common)
    raise UnsupportedModelError(f"open_clip resize_mode {mode!r} (letterboxing) has no processor equivalent")


def load_open_clip(path: Path, progress=print):
    """(CLIPModel, tokenizer, image processor) from an open_clip folder."""
    path = Path(path)
    model_cfg, pp = read_config(path)
    _check_options(model_cfg)
    if "quick_gelu" not in model_cfg:
        # open_clip takes QuickGELU from its pretrained tag, not always from the saved config;
        # OpenAI-trained weights run with GELU give subtly wrong embeddings.
        progress(f'warning: {CONFIG_NAME} does not say "quick_gelu"; using GELU, open_clip\'s default. '
                 'OpenAI-trained weights need QuickGELU: add "quick_gelu": true to its model_cfg')
    tokenizer = _tokenizer(path, f"open_clip keeps its BPE inside its package; copy them next to {CONFIG_NAME}")
    return _clip_model(load_state_dict(path), model_cfg, pp, tokenizer)


def load_openai(archive: Path, progress=print):
    """(CLIPModel, tokenizer, image processor) from OpenAI's TorchScript release."""
    import torch

    archive = Path(archive)
    progress(f"reading the tensors of {archive.name} (an OpenAI TorchScript archive)")
    try:
        with warnings.catch_warnings():  # deprecated in favour of torch.export, but the archive is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            sd = torch.jit.load(str(archive), map_location="cpu").state_dict()
    except (RuntimeError, OSError, ValueError) as e:
        raise UnsupportedModelError(f"{archive} does not load as a TorchScript archive (a truncated copy?): "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    sd = {k: v for k, v in sd.items() if k not in _OPENAI_META}
    if "ln_final.weight" not in sd:
        raise UnsupportedModelError(f"{archive} is a TorchScript archive, but not of an OpenAI CLIP network")
    tokenizer = _tokenizer(archive.parent, "OpenAI's clip package keeps its BPE inside the package; copy them next to the archive")
    model_cfg = {"quick_gelu": True, "vision_cfg": {"head_width": 64}, "text_cfg": {"heads": sd["ln_final.weight"].shape[0] // 64}}
    return _clip_model(sd, model_cfg, {}, tokenizer)


def _tokenizer(folder: Path, where: str):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise WeightsNotFoundError(
            f"{folder} has no tokenizer files ({' or '.join(TOKENIZER_FILES)} with merges.txt): {where}. "
            f"The CLIP tokenizer files of any transformers CLIP folder are the same BPE"
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _clip_model(sd: dict, model_cfg: dict, pp: dict, tokenizer):
    """The state dict (OpenAI layout) as a CLIPModel, with the processor for `pp`."""
    from transformers import CLIPConfig, CLIPModel

    converted = convert_state_dict(sd)
    eos = tokenizer.eos_token_id
    vocab = sd["token_embedding.weight"].shape[0]
    if eos != vocab - 1:
        # open_clip pools at argmax(token id), transformers at the first end-of-text token:
        # the two agree only when end-of-text is the largest id, as in CLIP's BPE.
        raise UnsupportedModelError(f"end-of-text id {eos} is not the largest token id ({vocab - 1})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    cfg = clip_config(model_cfg, sd, eos, tokenizer.bos_token_id, pad)
    model = CLIPModel(CLIPConfig(**cfg))
    model.load_state_dict(converted, strict=True)
    image_size = cfg["vision_config"]["image_size"]
    return model.eval(), tokenizer, image_processor(pp, image_size)
