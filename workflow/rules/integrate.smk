# Integrate a study (livermsc.integrate): merge its QC'd samples, normalise (shifted log),
# batch-aware seurat_v3 HVGs (with documented fallbacks for small or degenerate batches,
# recorded in uns["hvg"]), unintegrated PCA baseline and scVI; saves the trained model.


rule integrate:
    input:
        samples=qc_samples,
    output:
        h5ad="results/{study}/integrated.h5ad",
        model=directory("results/{study}/scvi_model"),
    log:
        "logs/integrate/{study}.log",
    benchmark:
        "benchmarks/integrate/{study}.tsv"
    conda:
        (
            "../../envs/scvi_cpu.yaml"
            if config["integrate"]["accelerator"] == "cpu"
            else "../../envs/scvi.yaml"
        )
    threads: 4
    resources:
        mem_mb=mem_mb_from_input(factor=12, minimum=4000, maximum=256000),
        runtime=runtime_from_input(minutes_per_gb=600, minimum=30),
        gpu=gpus_for(config["integrate"]["accelerator"]),
    params:
        entry="livermsc.integrate:rule_integrate",
        cfg=config["integrate"],
        seed=config["seed"],
    script:
        ENTRY
