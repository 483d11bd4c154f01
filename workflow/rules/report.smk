# Report: a figure per claim contrast, the claims x studies heat map, the forest plot of the
# meta-analysis and the run summary (results/summary.md, results/summary.html). Every output
# marked with report() goes into `snakemake --report results/report.html`, described by
# workflow/report/workflow.rst; categories follow REPORT_CATEGORY (common.smk).


report: "../report/workflow.rst"


# Arms that no claim compares are allowed (their samples are still analysed); say so up front.
from livermsc.config import unused_arm_notes

for _note in unused_arm_notes(STUDIES, config["claims"]["catalogue"]):
    print(f"livermsc: {_note}", file=sys.stderr)


rule report_claims:
    input:
        scores="results/{study}/scores/sample_scores.tsv",
        claims="results/{study}/claims.tsv",
    output:
        figures=report(
            directory("results/report/{study}/claims"),
            patterns=[f"{{name}}.{REPORT_FORMAT}"],
            caption="../report/claim_figure.rst",
            category=REPORT_CATEGORY["claims"],
            subcategory="{study}",
            labels={"study": "{study}", "claim contrast": "{name}"},
        ),
    log:
        "logs/report_claims/{study}.log",
    benchmark:
        "benchmarks/report_claims/{study}.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb_from_input(factor=20, minimum=2000),
        runtime=runtime_from_input(minutes_per_gb=120, minimum=10),
    params:
        entry="livermsc.report:rule_report_claims",
        formats=config["figures"]["formats"],
        dpi=config["figures"]["dpi"],
        stages=sample_stages,
    script:
        ENTRY


rule report_summary:
    input:
        claims=expand("results/{study}/claims.tsv", study=config["studies"]),
        meta="results/claims_meta.tsv",
        figures=expand("results/report/{study}/claims", study=config["studies"]),
        qc=expand("results/{study}/qc/qc_summary.tsv", study=config["studies"]),
        metrics=expand(
            "results/{study}/integration_metrics.tsv", study=config["studies"]
        ),
    output:
        heatmap=report_figure(
            "results/report/claims_heatmap",
            caption="../report/heatmap.rst",
            category=REPORT_CATEGORY["summary"],
            subcategory="all studies",
            labels={"figure": "effects heat map"},
        ),
        forest=report_figure(
            "results/report/claims_forest",
            caption="../report/forest.rst",
            category=REPORT_CATEGORY["summary"],
            subcategory="all studies",
            labels={"figure": "forest plot"},
        ),
        verdicts=report(
            "results/report/verdicts.tsv",
            caption="../report/verdicts.rst",
            category=REPORT_CATEGORY["summary"],
            subcategory="all studies",
            labels={"figure": "verdict table"},
        ),
        md="results/summary.md",
        html=report(
            "results/summary.html",
            caption="../report/summary.rst",
            category=REPORT_CATEGORY["summary"],
            subcategory="all studies",
            labels={"figure": "summary"},
        ),
    log:
        "logs/report_summary/all.log",
    benchmark:
        "benchmarks/report_summary/all.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb_from_input(factor=10, minimum=2000),
        runtime=runtime_from_input(minutes_per_gb=60, minimum=10),
    params:
        entry="livermsc.report:rule_report_summary",
        studies=config["studies"],
        formats=config["figures"]["formats"],
        dpi=config["figures"]["dpi"],
        effect_limit=config["report"]["effect_limit"],
        embed=config["report"]["embed_figures"],
    script:
        ENTRY


ALL_TARGETS.extend(["results/summary.md", "results/summary.html"])
