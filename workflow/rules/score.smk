# Score a study (livermsc.score): per-cell signature scores (scanpy score_genes, decoupler ULM),
# pseudobulk per sample x population, sample-level signature scores (voom primary,
# pseudobulk_z, pseudobulk_mean, ssGSEA, per-cell score means) and cell-population shares, in
# long format; population_coverage.tsv: the signature genes each population keeps.


rule score:
    input:
        adata="results/{study}/annotated.h5ad",
        signatures=config["score"]["signatures"],
        catalogue=config["claims"]["catalogue"],
    output:
        scores=report(
            "results/{study}/scores/sample_scores.tsv",
            caption="../report/score.rst",
            category=REPORT_CATEGORY["score"],
            subcategory="{study}",
            labels={"study": "{study}", "figure": "sample scores table"},
        ),
        coverage=report(
            "results/{study}/scores/signature_coverage.tsv",
            caption="../report/score.rst",
            category=REPORT_CATEGORY["score"],
            subcategory="{study}",
            labels={"study": "{study}", "figure": "signature coverage table"},
        ),
        population_coverage="results/{study}/scores/population_coverage.tsv",
        pseudobulk="results/{study}/scores/pseudobulk.h5ad",
        cells="results/{study}/scores/cell_scores.tsv.gz",
        gmt="results/{study}/scores/signatures.gmt",
    log:
        "logs/score/{study}.log",
    benchmark:
        "benchmarks/score/{study}.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1  # ssGSEA's threads gain nothing here; one lets the metrics job run alongside
    resources:
        mem_mb=mem_mb_from_input(factor=6, minimum=4000, maximum=256000),
        runtime=runtime_from_input(minutes_per_gb=60, minimum=15),
    params:
        entry="livermsc.score:rule_score",
        cfg=config["score"],
        species=study_species,
        seed=config["seed"],
    script:
        ENTRY


ALL_TARGETS.extend(
    expand(
        "results/{study}/scores/{name}",
        study=config["studies"],
        name=["sample_scores.tsv", "signature_coverage.tsv"],
    )
)
