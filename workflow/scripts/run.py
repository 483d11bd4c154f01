"""Entry point of every livermsc rule: calls the function named in params.entry."""

from livermsc.runner import run

run(snakemake)  # noqa: F821 - injected by Snakemake's script directive
