# Test the claims (livermsc.claims, livermsc.stats): per study, one verdict per claim x contrast
# from sample-level statistics (animals as units, BH q-values); across studies, a DerSimonian-
# Laird random-effects meta-analysis of Hedges' g (forest plot: report stage).


rule claims:
    input:
        scores="results/{study}/scores/sample_scores.tsv",
        coverage="results/{study}/scores/signature_coverage.tsv",
        catalogue=config["claims"]["catalogue"],
        signatures=config["score"]["signatures"],
    output:
        claims="results/{study}/claims.tsv",
        methods="results/{study}/claims_methods.tsv",
        summary="results/{study}/claims_summary.md",
    log:
        "logs/claims/{study}.log",
    benchmark:
        "benchmarks/claims/{study}.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        entry="livermsc.claims:snakemake_entry",
        cfg=config["claims"],
        score_cfg=config["score"],
        species=study_species,
    script:
        ENTRY


rule claims_meta:
    input:
        claims=expand("results/{study}/claims.tsv", study=config["studies"]),
    output:
        meta="results/claims_meta.tsv",
    log:
        "logs/claims_meta/all.log",
    benchmark:
        "benchmarks/claims_meta/all.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        entry="livermsc.claims:snakemake_meta_entry",
        cfg=config["claims"],
    script:
        ENTRY


ALL_TARGETS.extend(
    expand(
        "results/{study}/{name}",
        study=config["studies"],
        name=["claims.tsv", "claims_summary.md"],
    )
)
ALL_TARGETS.append("results/claims_meta.tsv")
