# Test the claims (livermsc.claims, livermsc.stats, livermsc.geneset): per study, one verdict per
# claim x contrast from one model on the animals (voom signature test on the pseudobulk counts,
# quasi-binomial shares, BH q-values, TOST, control gating); across studies, REML random-effects
# pooling of Hedges' g with Hartung-Knapp intervals (forest plot: report stage).


rule claims:
    input:
        scores="results/{study}/scores/sample_scores.tsv",
        coverage="results/{study}/scores/signature_coverage.tsv",
        pseudobulk="results/{study}/scores/pseudobulk.h5ad",
        catalogue=config["claims"]["catalogue"],
        signatures=config["score"]["signatures"],
        celltypes=config["cluster"]["celltypes"],
    output:
        claims=report(
            "results/{study}/claims.tsv",
            caption="../report/claims.rst",
            category=REPORT_CATEGORY["claims"],
            subcategory="{study}",
            labels={"study": "{study}", "claim contrast": "claims table"},
        ),
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
        mem_mb=mem_mb_from_input(factor=3, minimum=2000, maximum=64000),
        runtime=runtime_from_input(minutes_per_gb=30, minimum=15),
    params:
        entry="livermsc.claims:rule_claims",
        cfg=config["claims"],
        score_cfg=config["score"],
        species=study_species,
        pairs=lambda wildcards: STUDIES[wildcards.study].pairs,
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
        entry="livermsc.claims:rule_claims_meta",
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
