"""`python -m mlc_llm VERB ...` (the `mlc_llm` console script): MLC-LLM's command line."""

from mlc_llm.cli import cli


def main() -> None:
    """Run the `mlc_llm` command line."""
    cli(prog_name="mlc_llm")


if __name__ == "__main__":
    main()
