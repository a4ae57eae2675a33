# Transfer of frozen features to other datasets (Sec. 5.2, Tables 4-7, Fig. 9).


rule transfer_features:
    input:
        model="results/models/{model}/final.pt",
        manifest="results/data/targets/{target}/manifest.parquet",
        meta="results/data/targets/{target}/dataset.json",
        lib=lib("transfer.py", "layer_features.py", "analysis.py"),
    output:
        features="results/transfer/{target}/{model}/features.npz",
    log:
        "results/logs/transfer_features/{target}/{model}.log",
    benchmark:
        "results/benchmarks/transfer_features/{target}/{model}.tsv"
    params:
        # Only what shapes the cached features: editing probe settings never re-extracts them.
        settings={k: v for k, v in study_settings(config, "transfer").items() if k in ("pool_size", "analysis", "device", "seed")},
    threads: config["analysis"]["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/transfer_features.py"


rule transfer:
    input:
        features="results/transfer/{target}/{model}/features.npz",
        model="results/models/{model}/final.pt",
        manifest="results/data/targets/{target}/manifest.parquet",
        meta="results/data/targets/{target}/dataset.json",
        lib=lib("transfer.py", "probes.py", "train.py", "models/data_init.py"),
    output:
        table="results/transfer/{target}/{model}/probes.parquet",
    log:
        "results/logs/transfer/{target}/{model}.log",
    benchmark:
        "results/benchmarks/transfer/{target}/{model}.tsv"
    params:
        settings=lambda wc: transfer_settings(config, wc.target, wc.model),
        # The from-scratch baseline trains with the model's own recipe (lr, momentum, ...).
        train=lambda wc: train_settings(config, wc.model),
    threads: config["analysis"]["threads"]
    resources:
        gpu=LOCAL_GPU,
        mem_mb=4000,
        runtime=60,
    conda:
        ENV
    script:
        "../scripts/transfer.py"


rule transfer_summary:
    input:
        tables=expand("results/transfer/{target}/{model}/probes.parquet", target=TARGETS, model=MODELS),
        histories=expand("results/models/{model}/history.parquet", model=MODELS),
        lib=lib("transfer_summary.py", "transfer.py", "paper.py"),
    output:
        table="results/transfer/transfer.parquet",
        accuracy="results/transfer/transfer_table.parquet",
        markdown="results/transfer/transfer_summary.md",
        summary_json="results/transfer/transfer_summary.json",
        figures=[
            report(
                f"results/transfer/figures/{target}.png",
                caption="../report/transfer.rst",
                category="Transfer (Tables 4-7, Fig. 9)",
            )
            for target in TARGETS
        ],
    log:
        "results/logs/transfer/summary.log",
    benchmark:
        "results/benchmarks/transfer/summary.tsv"
    params:
        models=MODELS,
        targets=TARGETS,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/transfer_summary.py"


if TARGETS:
    OUTPUTS.extend(["results/transfer/transfer.parquet", "results/transfer/transfer_summary.md"])
    OUTPUTS.extend(expand("results/transfer/figures/{target}.png", target=TARGETS))
