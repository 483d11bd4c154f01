# Acquire a study's counts: simulate the built-in demo study (source: simulate), or download a
# public study's files and unpack them into one input per sample (source: geo or url).


rule simulate_study:
    input:
        signatures=config["score"]["signatures"],
    output:
        data=directory("resources/{study}/simulated"),
    log:
        "logs/simulate/{study}.log",
    benchmark:
        "benchmarks/simulate/{study}.tsv"
    conda:
        "../../envs/scanpy.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    params:
        entry="livermsc.simulate:rule_simulate_study",
        spec=lambda wc: STUDIES[wc.study].spec,
        seed=config["seed"],
    script:
        ENTRY


# Download a public study's files (source geo/url). Local rules: login nodes have network,
# compute nodes often do not. `snakemake fetch_all` downloads and unpacks every configured study.
localrules:
    fetch_file,
    fetch_all,


rule fetch_file:
    output:
        download_output("resources/{study}/downloads/{file}"),
    log:
        "logs/fetch_file/{study}/{file}.log",
    benchmark:
        "benchmarks/fetch_file/{study}/{file}.tsv"
    wildcard_constraints:
        file=r"[A-Za-z0-9_.+-]+",
    conda:
        "../../envs/fetch.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=240,
    params:
        entry="livermsc.fetch:rule_fetch_file",
    script:
        ENTRY


# Unpack one study's downloads into one input per sample at <data_dir>/<path> (where ingest reads
# it): RAW.tar members regrouped into 10x folders, per-sample files linked, combined matrices split.
# One rule per study, because each study has its own set of sample outputs.
for _study, _plan in FETCH_PLANS.items():

    rule:
        name:
            f"unpack_{_study.replace('-', '_').replace('.', '_')}"
        input:
            downloads=_plan.download_paths(),
        output:
            unpack_outputs(_plan),
            manifest=f"{_plan.data_dir}/fetch_manifest.tsv",
        log:
            f"logs/unpack/{_study}.log",
        benchmark:
            f"benchmarks/unpack/{_study}.tsv"
        conda:
            "../../envs/scanpy.yaml"
        threads: 1
        resources:
            mem_mb=8000,
            runtime=120,
        params:
            entry="livermsc.fetch:rule_unpack",
            plan=_plan.as_dict(for_unpack=True),
        script:
            ENTRY


rule fetch_all:
    input:
        fetch_manifests,
