"""Entry point of every livermsc rule: calls the function named in params.entry."""

from livermsc.runner import main

main(snakemake)  # noqa: F821 - injected by Snakemake's script directive
