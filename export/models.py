"""Load the frozen reference models from local folders or the Hugging Face cache, offline."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from itemrt.errors import UnsupportedModelError, WeightsNotFoundError
from itemrt.stages.preprocess import RESAMPLE_NAMES, ImageSpec

from .open_clip import (
    CONFIG_NAME,
    checkpoint_format,
    load_open_clip,
    load_openai,
    openai_archive,
)

DEFAULT_SOURCES = {
    "captioner": "Salesforce/blip-image-captioning-base",
    "detector": "google/owlvit-base-patch32",
    "clip": "openai/clip-vit-large-patch14",
}


@dataclass(frozen=True)
class Source:
    """Where one model came from, as the manifest records it."""

    model_id: str
    path: str
    revision: str | None

    @classmethod
    def from_dict(cls, d: dict) -> Source:
        return cls(d["model_id"], d["path"], d.get("revision"))  # "format" is derived from the path

    def to_dict(self) -> dict:
        fmt = checkpoint_format(Path(self.path))
        return {"model_id": self.model_id, "path": self.path, "revision": self.revision, "format": fmt}


def resolve(spec: str, revision: str | None = None) -> Source:
    """A local folder (or OpenAI's CLIP archive file), or a repo id already in the Hugging Face
    cache, optionally at a revision (`REPO@REV`: a commit, branch or tag). Never downloads."""
    p = Path(spec).expanduser()
    if p.exists():
        if checkpoint_format(p) == "transformers" and not (p / "config.json").is_file():
            raise WeightsNotFoundError(
                f"{p} is not a model: no config.json (a Hugging Face model folder), no {CONFIG_NAME} (an open_clip "
                f"one), and not a single OpenAI CLIP archive (*.pt, as the file or in the folder)"
            )
        return Source(spec, str(p.resolve()), revision)
    if spec.startswith((".", "/", "~")):
        raise WeightsNotFoundError(f"model folder {spec} does not exist")
    repo, _, at = spec.partition("@")
    revision = revision or at or None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import snapshot_download

    cache = _hub_cache()
    try:
        path = snapshot_download(repo, revision=revision, local_files_only=True, cache_dir=cache)
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        raise WeightsNotFoundError(
            f"{repo}{'@' + revision if revision else ''} is neither a local folder nor in the Hugging Face cache "
            f"({type(e).__name__}; {_cached(cache, repo)}). Nothing is downloaded here: copy the model folder to "
            f"this machine and pass its path, or fill the cache (HF_HOME) elsewhere and bring it along"
        ) from None
    return Source(repo, path, revision or Path(path).name)


def _hub_cache() -> Path:
    """The Hugging Face hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached(cache: Path, repo: str) -> str:
    """What the cache holds of `repo`: enough to pick a revision that is there."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshots = sorted(p.name for p in (folder / "snapshots").glob("*") if p.is_dir())
    refs = sorted(p.name for p in (folder / "refs").glob("*") if p.is_file())
    if not snapshots:
        return f"{cache} holds no snapshot of it"
    return (f"{cache} holds snapshots {', '.join(snapshots)} and refs {', '.join(refs) or 'none'}: "
            f"pass {repo}@<snapshot> to use one")


@dataclass
class Models:
    """The frozen models with their own tokenizers and (PIL-backend) image processors."""

    blip: object
    blip_tokenizer: object
    blip_processor: object
    owl: object
    owl_tokenizer: object
    owl_processor: object
    clip: object
    clip_tokenizer: object
    clip_processor: object
    sources: dict[str, Source]


def load_models(sources: dict[str, Source], progress=print) -> Models:
    from transformers import (
        AutoTokenizer,
        BlipForConditionalGeneration,
        CLIPModel,
        OwlViTForObjectDetection,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import (
        OwlViTImageProcessorPil,
    )

    def load(kind, cls, ip_cls):
        path = sources[kind].path
        fmt = checkpoint_format(Path(path)) if kind == "clip" else "transformers"
        if fmt != "transformers":
            progress(f"loading {kind} from {path} ({fmt} checkpoint, converted to CLIPModel)")
            return load_openai(openai_archive(Path(path)), progress) if fmt == "openai" else load_open_clip(Path(path), progress)
        progress(f"loading {kind} from {path}")
        _check_model_type(kind, Path(path), cls.__name__)
        try:
            # mismatched shapes come back in `info` (checked below, with their names) instead of a
            # RuntimeError that names none of them
            model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True,
                                              ignore_mismatched_sizes=True)
            tokenizer, processor = AutoTokenizer.from_pretrained(path, local_files_only=True), ip_cls.from_pretrained(path)
        except OSError as e:
            raise WeightsNotFoundError(f"cannot load {kind} from {path}: {e}") from None
        # transformers fills weights a checkpoint lacks with random ones, and only logs it: the
        # export would then be faithful to a model nobody trained.
        lacking = sorted(info["missing_keys"]) + sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
        if lacking:
            raise UnsupportedModelError(
                f"{path} lacks {len(lacking)} weights of {cls.__name__} or has them in other shapes "
                f"({', '.join(lacking[:4])}{', ...' if len(lacking) > 4 else ''}); they would be random. "
                f"Give --{kind} the folder of a whole {MODEL_TYPES[kind]} checkpoint")
        return model.eval(), tokenizer, processor

    blip = load("captioner", BlipForConditionalGeneration, BlipImageProcessorPil)
    owl = load("detector", OwlViTForObjectDetection, OwlViTImageProcessorPil)
    clip = load("clip", CLIPModel, CLIPImageProcessorPil)
    return Models(*blip, *owl, *clip, sources=sources)


# config.json's model_type for each part: transformers loads a folder into any class, with a warning.
MODEL_TYPES = {"captioner": "blip", "detector": "owlvit", "clip": "clip"}


def _check_model_type(kind: str, folder: Path, cls_name: str) -> None:
    try:
        found = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise WeightsNotFoundError(f"cannot read {folder / 'config.json'}: {e}") from None
    if found != MODEL_TYPES[kind]:
        raise UnsupportedModelError(
            f"{folder} holds a {found!r} model; --{kind} takes a {MODEL_TYPES[kind]!r} one ({cls_name})")


def image_spec(ip) -> ImageSpec:
    """The processor's preprocessing, in the runtime's terms."""
    size, crop = dict(ip.size), dict(ip.crop_size or {}) if ip.do_center_crop else {}
    exact = "height" in size
    return ImageSpec(
        resize="exact" if exact else "shortest_edge",
        height=size.get("height", 0),
        width=size.get("width", 0),
        shortest_edge=size.get("shortest_edge", 0),
        crop_height=crop.get("height", 0),
        crop_width=crop.get("width", 0),
        resample=RESAMPLE_NAMES[int(ip.resample)],
        rescale=float(ip.rescale_factor) if ip.do_rescale else 1.0,
        mean=tuple(float(x) for x in ip.image_mean),
        std=tuple(float(x) for x in ip.image_std),
    )
