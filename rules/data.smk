# The DAG's first step: every dataset becomes images + manifest.parquet (+ parts.parquet).


rule dataset:
    input:
        lib=lib("data/common.py", "data/build.py", "data/synthetic.py", "data/real.py"),
    output:
        manifest=f"{DATA}/manifest.parquet",
        parts=f"{DATA}/parts.parquet",
        meta=f"{DATA}/dataset.json",
        images=directory(f"{DATA}/images"),
    log:
        "results/logs/dataset/source.log",
    benchmark:
        "results/benchmarks/dataset/source.tsv"
    params:
        settings=dataset_settings(config),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    script:
        "../scripts/dataset.py"


rule target_dataset:
    input:
        # Synthetic targets are generated, the paper's (caltech101/256, voc2012) exported by data/real.py.
        lib=lambda wc: lib("data/common.py", "data/build.py", "data/synthetic.py" if wc.target == "synthetic_target" else "data/real.py"),
    output:
        manifest="results/data/targets/{target}/manifest.parquet",
        parts="results/data/targets/{target}/parts.parquet",
        meta="results/data/targets/{target}/dataset.json",
        images=directory("results/data/targets/{target}/images"),
    log:
        "results/logs/dataset/{target}.log",
    benchmark:
        "results/benchmarks/dataset/{target}.tsv"
    params:
        settings=lambda wc: target_settings(config, wc.target),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    script:
        "../scripts/dataset.py"
