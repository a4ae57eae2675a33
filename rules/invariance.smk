# Invariance of features and prediction to vertical translation, scale and rotation (Sec. 4.2, Fig. 5).


rule invariance:
    input:
        model="results/models/{model}/final.pt",
        manifest=f"{DATA}/manifest.parquet",
        meta=f"{DATA}/dataset.json",
        lib=lib("invariance.py", "layer_features.py", "analysis.py"),
    output:
        table="results/invariance/{model}/invariance.parquet",
        figure=report(
            "results/invariance/{model}/invariance.png",
            caption="../report/invariance.rst",
            category="Invariance (Fig. 5)",
            subcategory="{model}",
        ),
    log:
        "results/logs/invariance/{model}.log",
    benchmark:
        "results/benchmarks/invariance/{model}.tsv"
    params:
        settings=study_settings(config, "invariance"),
    threads: config["analysis"]["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/invariance.py"


OUTPUTS.extend(expand("results/invariance/{model}/invariance.parquet", model=MODELS))
OUTPUTS.extend(expand("results/invariance/{model}/invariance.png", model=MODELS))
