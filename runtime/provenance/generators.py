"""Which generator a file's metadata names, and whether it declares generated media: the marks
image generators and their front ends leave (PNG text chunks, EXIF UserComment, XMP's IPTC
fields, tool names in Software / CreatorTool). Prompts are noted, not echoed, unless asked for."""

from __future__ import annotations

import json
import re

from .evidence import DIGITAL_SOURCE_TYPES, ProvenanceLimits, Signal, clip, source_type_code
from .metadata import Field

# Tool names that, in Software / CreatorTool / a C2PA claim generator, name an image generator.
# Lower-case substrings; an editor's name (Photoshop, GIMP) says nothing either way.
GENERATOR_NAMES = {
    "novelai": "NovelAI",
    "midjourney": "Midjourney",
    "dall-e": "DALL-E",
    "dall·e": "DALL-E",
    "adobe firefly": "Adobe Firefly",
    "stable diffusion": "Stable Diffusion",
    "comfyui": "ComfyUI",
    "automatic1111": "AUTOMATIC1111",
    "invokeai": "InvokeAI",
    "fooocus": "Fooocus",
    "imagen": "Imagen",
}

# PNG text keywords that only generators write, and which one (AUTOMATIC1111's "parameters" and
# ComfyUI's "prompt" are told apart from look-alikes below).
_PNG_KEYS = {
    "invokeai_metadata": "InvokeAI",
    "invokeai_graph": "InvokeAI",
    "sd-metadata": "InvokeAI",
    "Dream": "InvokeAI",
    "fooocus_scheme": "Fooocus",
    "negative_prompt": "Easy Diffusion",
    "Negative Prompt": "Easy Diffusion",
    "use_stable_diffusion_model": "Easy Diffusion",
}
_MODEL = re.compile(r"(?:^|, )Model: ([^,\n]{1,120})")
_CKPT = re.compile(r'"ckpt_name"\s*:\s*"([^"]{1,120})"')


def generator_name(tool: str) -> str | None:
    low = tool.lower()
    return next((name for key, name in GENERATOR_NAMES.items() if key in low), None)


class _Marks:
    """Signals of one file's metadata, a generator's several fields merged into one signal."""

    def __init__(self, limits: ProvenanceLimits, include_prompts: bool):
        self.limits, self.include_prompts = limits, include_prompts
        self.signals: list[Signal] = []
        self.tools: dict[tuple[str, str], dict] = {}  # (source, generator) -> fields, notes, prompt

    def signal(self, source: str, key: str, value: str, declares: bool | None, generator: str | None = None,
               prompt: str | None = None) -> None:
        self.signals.append(Signal(source, key, clip(value), declares, "no", generator,
                                   prompt is not None, self._echo(prompt)))

    def tool(self, source: str, generator: str, key: str, note: str = "", prompt: str | None = None) -> None:
        t = self.tools.setdefault((source, generator), {"keys": [], "notes": [], "prompt": None, "has_prompt": False})
        t["keys"].append(key)
        if note and note not in t["notes"]:
            t["notes"].append(note)
        if prompt is not None and prompt.strip():
            t["has_prompt"] = True
            t["prompt"] = t["prompt"] or prompt

    def _echo(self, prompt: str | None) -> str | None:
        if not self.include_prompts or prompt is None:
            return None
        return prompt.strip()[: self.limits.max_prompt_chars]

    def done(self) -> list[Signal]:
        for (source, generator), t in self.tools.items():
            value = "; ".join([generator, *t["notes"], *(["prompt present"] if t["has_prompt"] else [])])
            self.signals.append(Signal(source, ", ".join(dict.fromkeys(t["keys"])), clip(value), True, "no",
                                       generator, t["has_prompt"], self._echo(t["prompt"])))
        return self.signals


def metadata_signals(fields: list[Field], limits: ProvenanceLimits, include_prompts: bool = False) -> list[Signal]:
    m = _Marks(limits, include_prompts)
    png = {f.key: f for f in fields if f.source == "png"}
    for f in fields:
        if f.source == "xmp":
            _xmp_field(m, f)
        elif f.source == "exif":
            _exif_field(m, f)
        elif f.source == "png":
            _png_field(m, f, png)
    return m.done()


def _xmp_field(m: _Marks, f: Field) -> None:
    if f.key == "Iptc4xmpExt:DigitalSourceType":
        code = source_type_code(f.text)
        m.signal("xmp", f.key, code, DIGITAL_SOURCE_TYPES.get(code))
    elif f.key in ("Iptc4xmpExt:AISystemUsed", "Iptc4xmpExt:AISystemVersionUsed"):
        m.signal("xmp", f.key, f.text, True, generator_name(f.text) or clip(f.text, 80))
    elif f.key == "Iptc4xmpExt:AIPromptInformation":
        m.signal("xmp", f.key, f"prompt information present ({len(f.text)} characters)", True, prompt=f.text)
    elif f.key == "xmp:CreatorTool":
        m.signal("xmp", f.key, f.text, True if generator_name(f.text) else None, generator_name(f.text))
    elif f.key == "dcterms:provenance":
        m.signal("xmp", f.key, f.text, None)


def _exif_field(m: _Marks, f: Field) -> None:
    text = f.text
    if f.key == "UserComment":
        if "\nSteps: " in text or text.startswith("Steps: "):  # AUTOMATIC1111 in JPEG / WebP
            m.tool("exif", "AUTOMATIC1111", f.key, *_a1111(text))
        elif text.lstrip().startswith("{") and '"use_stable_diffusion_model"' in text:
            m.tool("exif", "Easy Diffusion", f.key, "", _json_str(text, "prompt"))
        return
    if text.startswith(("prompt:{", "workflow:{")):  # ComfyUI's WebP: its graph in Make / Model
        m.tool("exif", "ComfyUI", f.key, _ckpt(text), _comfy_prompt(text.split(":", 1)[1]))
    elif f.key == "Software":
        m.signal("exif", f.key, text, True if generator_name(text) else None, generator_name(text))


def _png_field(m: _Marks, f: Field, png: dict[str, Field]) -> None:
    key, text = f.key, f.text
    if key == "parameters":
        if text.lstrip().startswith("{"):
            if '"sui_image_params"' in text:
                m.tool("png", "SwarmUI", key, "", _json_str(text, "prompt", "sui_image_params"))
            elif "fooocus_scheme" in png or '"Fooocus' in text:
                m.tool("png", "Fooocus", key, "", _json_str(text, "prompt") or _json_str(text, "Prompt"))
            else:
                m.tool("png", "unknown generator", key, "JSON parameters")
        else:
            m.tool("png", "AUTOMATIC1111", key, *_a1111(text))
    elif key in ("prompt", "workflow") and text.lstrip().startswith("{"):
        m.tool("png", "ComfyUI", key, _ckpt(text), _comfy_prompt(text) if key == "prompt" else None)
    elif key in _PNG_KEYS:
        m.tool("png", _PNG_KEYS[key], key, "", _invokeai_prompt(key, text))
    elif key in ("prompt", "Prompt"):
        gen = "Easy Diffusion" if any(k in png for k in ("negative_prompt", "Negative Prompt")) else "unknown generator"
        m.tool("png", gen, key, "" if gen != "unknown generator" else "a prompt text chunk", text)
    elif key == "Software" and generator_name(text) == "NovelAI":
        m.tool("png", "NovelAI", key, clip(png["Source"].text, 80) if "Source" in png else "")
    elif key in ("Comment", "Description") and png.get("Software") and generator_name(png["Software"].text) == "NovelAI":
        # NovelAI: the prompt is Description, the settings (and prompt again) a JSON Comment
        m.tool("png", "NovelAI", key, "", text if key == "Description" else _json_str(text, "prompt"))
    elif key == "Software":
        m.signal("png", key, text, True if generator_name(text) else None, generator_name(text))


def _a1111(text: str) -> tuple[str, str | None]:
    """AUTOMATIC1111's parameters: the prompt, "Negative prompt: ...", then a "Steps: ..." line."""
    steps = 0 if text.startswith("Steps: ") else text.rfind("\nSteps: ")
    neg = text.find("Negative prompt:")
    cut = min(x for x in (steps, neg) if x >= 0) if max(steps, neg) >= 0 else len(text)
    model = _MODEL.search(text[steps:] if steps >= 0 else "")
    return (f"model {model.group(1).strip()}" if model else ""), text[:cut]


def _invokeai_prompt(key: str, text: str) -> str | None:
    """InvokeAI's prompt: invokeai_metadata's positive_prompt (v3+), sd-metadata's image.prompt
    (v2), or the whole legacy "Dream" command line, which starts with it."""
    if key == "invokeai_metadata":
        return _json_str(text, "positive_prompt")
    if key == "sd-metadata":
        return _json_str(text, "prompt", "image")
    return text if key == "Dream" else None


def _ckpt(text: str) -> str:
    found = _CKPT.search(text)
    return f"model {found.group(1)}" if found else ""


def _comfy_prompt(text: str) -> str | None:
    """The first CLIPTextEncode node's text in ComfyUI's API graph; "" when the graph has none
    (no prompt present), None when it is not JSON."""
    graph = _json(text)
    if not isinstance(graph, dict):
        return None
    for node in graph.values():
        if isinstance(node, dict) and str(node.get("class_type", "")).startswith("CLIPTextEncode"):
            inputs = node.get("inputs")
            value = inputs.get("text") if isinstance(inputs, dict) else None
            if isinstance(value, str) and value.strip():
                return value
    return ""


def _json_str(text: str, key: str, inside: str | None = None) -> str | None:
    obj = _json(text)
    if inside and isinstance(obj, dict):
        obj = obj.get(inside)
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, cut short, or nested past the recursion limit
        return None
