# Cluster and annotate a study (livermsc.cluster, livermsc.annotate): kNN graph on the scVI
# latent space, Leiden at several resolutions, UMAP and marker tables; cell types and states
# from the marker panel; integration metrics (PCA baseline vs scVI) and the stage's figures.
# The metrics and figures are diagnostics: what cannot be computed on a study (one cell type,
# one batch, no panel marker among the genes) is written as "not computed: why", never a failure.

from livermsc.cluster import ClusterInputError, check_config

CLUSTER = config["cluster"]
checked(check_config, CLUSTER, errors=(ClusterInputError,))
RESOLUTION_KEYS = [f"leiden_{float(r):g}" for r in CLUSTER["resolutions"]]
UMAP_FIGURES = ["sample", "arm", "cluster", "cell_type", "cell_state"]
# optional scANVI label transfer from an annotated reference (cluster.annotation.reference)
REFERENCE = CLUSTER["annotation"]["reference"]


rule cluster:
    input:
        h5ad="results/{study}/integrated.h5ad",
    output:
        h5ad=temp("results/{study}/clustered.h5ad"),
        markers=expand(
            "results/{{study}}/markers/{key}.tsv",
            key=RESOLUTION_KEYS,
        ),
    log:
        "logs/cluster/{study}.log",
    benchmark:
        "benchmarks/cluster/{study}.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb_from_input(factor=10, minimum=4000, maximum=256000),
        runtime=runtime_from_input(minutes_per_gb=120, minimum=15),
    params:
        entry="livermsc.cluster:rule_cluster",
        cfg=CLUSTER,
        seed=config["seed"],
    script:
        ENTRY


# With cluster.annotation.reference set, labels are transferred from the reference with
# scANVI (livermsc.reference, scVI environment); otherwise the marker panel alone.
if REFERENCE:

    rule annotate_reference:
        input:
            integrated="results/{study}/integrated.h5ad",
            clustered="results/{study}/clustered.h5ad",
            celltypes=CLUSTER["celltypes"],
            reference=REFERENCE["path"],
        output:
            h5ad="results/{study}/annotated.h5ad",
            table=report(
                "results/{study}/annotation/clusters.tsv",
                caption="../report/cluster.rst",
                category=REPORT_CATEGORY["cluster"],
                subcategory="{study}",
                labels={"study": "{study}", "figure": "cluster annotation table"},
            ),
        log:
            "logs/annotate/{study}.log",
        benchmark:
            "benchmarks/annotate/{study}.tsv"
        conda:
            "../../envs/scvi_cpu.yaml"
        threads: 2
        resources:
            mem_mb=mem_mb_from_input(factor=8, minimum=4000, maximum=256000),
            runtime=runtime_from_input(minutes_per_gb=60, minimum=10),
        params:
            entry="livermsc.reference:rule_annotate_reference",
            cfg=CLUSTER,
            species=study_species,
            seed=config["seed"],
        script:
            ENTRY

else:

    rule annotate:
        input:
            integrated="results/{study}/integrated.h5ad",
            clustered="results/{study}/clustered.h5ad",
            celltypes=CLUSTER["celltypes"],
        output:
            h5ad="results/{study}/annotated.h5ad",
            table=report(
                "results/{study}/annotation/clusters.tsv",
                caption="../report/cluster.rst",
                category=REPORT_CATEGORY["cluster"],
                subcategory="{study}",
                labels={"study": "{study}", "figure": "cluster annotation table"},
            ),
        log:
            "logs/annotate/{study}.log",
        benchmark:
            "benchmarks/annotate/{study}.tsv"
        conda:
            "../../envs/scanpy.yaml"
        threads: 1
        resources:
            mem_mb=mem_mb_from_input(factor=8, minimum=4000, maximum=256000),
            runtime=runtime_from_input(minutes_per_gb=60, minimum=10),
        params:
            entry="livermsc.annotate:rule_annotate",
            cfg=CLUSTER,
            species=study_species,
            seed=config["seed"],
        script:
            ENTRY


rule integration_metrics:
    input:
        h5ad="results/{study}/annotated.h5ad",
    output:
        table=report(
            "results/{study}/integration_metrics.tsv",
            caption="../report/integrate.rst",
            category=REPORT_CATEGORY["integrate"],
            subcategory="{study}",
            labels={"study": "{study}", "figure": "integration metrics table"},
        ),
        figures=report_figure(
            "results/{study}/figures/integration_metrics",
            caption="../report/integrate.rst",
            category=REPORT_CATEGORY["integrate"],
            subcategory="{study}",
            labels={"study": "{study}", "figure": "integration metrics"},
        ),
    log:
        "logs/integration_metrics/{study}.log",
    benchmark:
        "benchmarks/integration_metrics/{study}.tsv"
    conda:
        "../../envs/scvi_cpu.yaml"
    threads: 1  # single-threaded: two would keep the score and claims jobs waiting
    resources:
        mem_mb=mem_mb_from_input(factor=8, minimum=4000, maximum=128000),
        runtime=runtime_from_input(minutes_per_gb=120, minimum=15),
    params:
        entry="livermsc.integrate:rule_integration_metrics",
        cfg=CLUSTER["metrics"],
        batch_key=config["integrate"]["batch_key"],
        formats=config["figures"]["formats"],
        dpi=config["figures"]["dpi"],
        seed=config["seed"],
    script:
        ENTRY


rule cluster_figures:
    input:
        h5ad="results/{study}/annotated.h5ad",
        celltypes=CLUSTER["celltypes"],
    output:
        figures=[
            path
            for name in [f"umap_{n}" for n in UMAP_FIGURES] + ["markers_dotplot"]
            for path in report_figure(
                f"results/{{study}}/figures/{name}",
                caption="../report/cluster.rst",
                category=REPORT_CATEGORY["cluster"],
                subcategory="{study}",
                labels={"study": "{study}", "figure": name.replace("_", " ")},
            )
        ],
    log:
        "logs/cluster_figures/{study}.log",
    benchmark:
        "benchmarks/cluster_figures/{study}.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb_from_input(factor=8, minimum=4000, maximum=128000),
        runtime=runtime_from_input(minutes_per_gb=60, minimum=10),
    params:
        entry="livermsc.cluster:rule_cluster_figures",
        resolution=CLUSTER["annotation"]["resolution"],
        species=study_species,
        formats=config["figures"]["formats"],
        dpi=config["figures"]["dpi"],
    script:
        ENTRY


for _study in config["studies"]:
    ALL_TARGETS.extend(
        [
            f"results/{_study}/annotated.h5ad",
            f"results/{_study}/annotation/clusters.tsv",
            f"results/{_study}/integration_metrics.tsv",
            *[f"results/{_study}/markers/{key}.tsv" for key in RESOLUTION_KEYS],
            *[
                f"results/{_study}/figures/{name}.{fmt}"
                for name in [f"umap_{n}" for n in UMAP_FIGURES]
                + ["markers_dotplot", "integration_metrics"]
                for fmt in config["figures"]["formats"]
            ],
        ]
    )
