# Acquire a study's counts: simulate the built-in demo study (source: simulate).


rule simulate_study:
    output:
        data=directory("resources/{study}/simulated"),
    params:
        entry="livermsc.simulate:snakemake_entry",
        spec=lambda wc: STUDIES[wc.study].spec,
        seed=config["seed"],
        signatures="config/signatures.yaml",
    log:
        "logs/simulate/{study}.log",
    benchmark:
        "benchmarks/simulate/{study}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    conda:
        "../../envs/scanpy.yaml"
    script:
        ENTRY
