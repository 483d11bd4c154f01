# Read each sample's counts (10x mtx/h5, h5ad, Seurat .rds/.rda, CSV/TSV; its own file or its
# cells of a combined file) into results/{study}/raw/{sample}.h5ad: raw counts in
# layers["counts"] (X empty), unique symbols, obs from the sample sheet (livermsc.ingest).


rule ingest:
    input:
        data=sample_input,
    output:
        h5ad="results/{study}/raw/{sample}.h5ad",
    log:
        "logs/ingest/{study}/{sample}.log",
    benchmark:
        "benchmarks/ingest/{study}/{sample}.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1
    resources:
        mem_mb=mem_mb_from_input(factor=20, minimum=2000, maximum=128000),
        runtime=runtime_from_input(minutes_per_gb=60, minimum=10),
    params:
        entry="livermsc.ingest:rule_ingest",
        sample_row=sample_row,
        species=study_species,
        simulated=is_simulated,
        combined=sample_combined,
    script:
        ENTRY
