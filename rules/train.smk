# Train each model (paper Sec. 3), keeping the Fig. 4 checkpoints and a resumable state.


rule train:
    input:
        manifest=f"{DATA}/manifest.parquet",
        meta=f"{DATA}/dataset.json",
        lib=lib("train.py", "data/common.py", "models/registry.py", "models/lenet.py", "models/zfnet.py", "models/data_init.py"),
    output:
        final="results/models/{model}/final.pt",
        history="results/models/{model}/history.parquet",
        checkpoints=directory("results/models/{model}/checkpoints"),
        curves=report(
            "results/models/{model}/training_curves.png",
            caption="../report/training.rst",
            category="Training",
            subcategory="{model}",
        ),
    log:
        "results/logs/train/{model}.log",
    benchmark:
        "results/benchmarks/train/{model}.tsv"
    params:
        arch=lambda wc: architecture_settings(config, wc.model),
        train=lambda wc: train_settings(config, wc.model),
        seed=config["seed"],
        device=config["device"],
        # Not an output: Snakemake would delete it before a retry, and a retry must resume.
        resume="results/models/{model}/resume/last.pt",
    threads: lambda wc: train_settings(config, wc.model)["threads"]
    resources:
        gpu=LOCAL_GPU,
        mem_mb=6000,
        runtime=240,
    conda:
        ENV
    script:
        "../scripts/train.py"
