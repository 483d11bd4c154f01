# Per-sample quality control (livermsc.qc): MAD-based outliers, mitochondrial limits per coarse
# cell class (hepatocytes are mitochondria-rich), Scrublet doublets, gene filter; filtered h5ad,
# per-sample table (cells flagged by each rule, per class) and figures, and a study summary.


rule qc:
    input:
        h5ad="results/{study}/raw/{sample}.h5ad",
    output:
        h5ad="results/{study}/qc/{sample}.h5ad",
        table="results/{study}/qc/tables/{sample}.tsv",
        figures=report_figure(
            "results/{study}/qc/figures/{sample}",
            caption="../report/qc.rst",
            category=REPORT_CATEGORY["qc"],
            subcategory="{study}",
            labels={
                "study": "{study}",
                "sample": "{sample}",
                "figure": "QC thresholds",
            },
        ),
    log:
        "logs/qc/{study}/{sample}.log",
    benchmark:
        "benchmarks/qc/{study}/{sample}.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb_from_input(factor=30, minimum=2000, maximum=128000),
        runtime=runtime_from_input(minutes_per_gb=120, minimum=10),
    params:
        entry="livermsc.qc:rule_qc",
        qc=config["qc"],
        overrides=qc_overrides,
        species=study_species,
        seed=config["seed"],
        formats=config["figures"]["formats"],
        dpi=config["figures"]["dpi"],
    script:
        ENTRY


rule qc_summary:
    input:
        tables=qc_tables,
    output:
        tsv=report(
            "results/{study}/qc/qc_summary.tsv",
            caption="../report/qc.rst",
            category=REPORT_CATEGORY["qc"],
            subcategory="{study}",
            labels={"study": "{study}", "sample": "all", "figure": "QC summary table"},
        ),
    log:
        "logs/qc_summary/{study}.log",
    benchmark:
        "benchmarks/qc_summary/{study}.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        entry="livermsc.qc:rule_qc_summary",
    script:
        ENTRY


ALL_TARGETS.extend(expand("results/{study}/qc/qc_summary.tsv", study=config["studies"]))
ALL_TARGETS.extend(
    f"results/{study}/qc/figures/{sample}.{fmt}"
    for study in config["studies"]
    for sample in samples_of(study)
    for fmt in config["figures"]["formats"]
)
