"""Resolving the `model` argument: an MLC dir, a path to mlc-chat-config.json, an `HF://`
link (MLC-format repos load as they are; plain HF repos are converted once into the cache),
or the name of an embedded model (`SmolLM2-135M-Instruct`, `gemma3-270m`)."""

from __future__ import annotations

import os
from pathlib import Path

from mlc.errors import ModelLoadError
from mlc.support.chat_config import CHAT_CONFIG_NAME
from mlc.support.embedded_models import SMOLLM2, embedded_for_repo, find_embedded
from mlc.support.paths import cache_root

EMBEDDED_NAME = SMOLLM2.name


def default_quantization(device_kind: str) -> str:
    """q4f32_1 on CPUs (float16 arithmetic is emulated there: 105 vs 39 tok/s decode, see
    bench/NOTES.md), q4f16_1 on GPUs; MLC_DEFAULT_QUANTIZATION overrides."""
    return os.environ.get("MLC_DEFAULT_QUANTIZATION",
                          "q4f32_1" if device_kind == "cpu" else "q4f16_1")


def _is_mlc_dir(path: Path) -> bool:
    return (path / CHAT_CONFIG_NAME).is_file()


def resolve_model(model: str | os.PathLike, quiet: bool = False,
                  device_kind: str = "cpu") -> Path:
    """A local MLC model dir for `model`, converting or downloading as needed."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_file() and path.name == CHAT_CONFIG_NAME:
        return path.parent
    if path.is_dir():
        if _is_mlc_dir(path):
            return path
        raise ModelLoadError(
            f"{path} has no {CHAT_CONFIG_NAME}: it is not an MLC model dir. Convert it first: "
            f"`mlc convert {path} --quantization q4f16_1 -o {path}-MLC`.", param="model")
    if text.startswith("HF://") or find_embedded(text) is not None:
        return _from_hub_or_embedded(text, quiet, default_quantization(device_kind))
    raise ModelLoadError(
        f"Model {text!r} not found. Pass an MLC model dir (from `mlc convert`), a path to "
        f"{CHAT_CONFIG_NAME}, an HF:// link, or {EMBEDDED_NAME!r}.", param="model")


def _from_hub_or_embedded(text: str, quiet: bool, quantization: str) -> Path:
    if text.startswith("HF://") and embedded_for_repo(text[len("HF://"):]) is None:
        repo = text[len("HF://"):]
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(repo, allow_patterns=[CHAT_CONFIG_NAME]))
        except Exception as e:  # noqa: BLE001 - offline, missing repo, auth...
            raise ModelLoadError(f"Cannot reach {text}: {e}. Download or convert it yourself "
                                 "and pass the local dir.", param="model") from e
        if _is_mlc_dir(local):   # an MLC-format repo: fetch the weights as they are
            return Path(snapshot_download(repo))
    out = cache_root() / "models" / f"{text.replace('HF://', '').replace('/', '--')}-" \
        f"{quantization}"
    if _is_mlc_dir(out):
        return out
    from mlc.compiler.convert import convert  # converting needs the compiler side

    convert(text, quantization, out, overwrite=False, quiet=quiet)
    return out
