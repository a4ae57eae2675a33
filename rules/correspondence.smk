# Correspondence of object parts across images: Delta per layer, parts vs random masks (Sec. 5, Table 1, Fig. 8).


rule correspondence:
    input:
        model="results/models/{model}/final.pt",
        manifest=f"{DATA}/manifest.parquet",
        parts=f"{DATA}/parts.parquet",
        meta=f"{DATA}/dataset.json",
        lib=lib("correspondence.py", "layer_features.py", "analysis.py", "paper.py"),
    output:
        deltas="results/correspondence/{model}/correspondence.parquet",
        table="results/correspondence/{model}/table1.parquet",
        table_figure=report(
            "results/correspondence/{model}/table1.png",
            caption="../report/correspondence.rst",
            category="Correspondence (Table 1, Fig. 8)",
            subcategory="{model}",
        ),
        bars=report(
            "results/correspondence/{model}/delta_by_layer.png",
            caption="../report/correspondence.rst",
            category="Correspondence (Table 1, Fig. 8)",
            subcategory="{model}",
        ),
        examples=report(
            "results/correspondence/{model}/occluders.png",
            caption="../report/correspondence.rst",
            category="Correspondence (Table 1, Fig. 8)",
            subcategory="{model}",
        ),
    log:
        "results/logs/correspondence/{model}.log",
    benchmark:
        "results/benchmarks/correspondence/{model}.tsv"
    params:
        settings=study_settings(config, "correspondence"),
    threads: config["analysis"]["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/correspondence.py"


OUTPUTS.extend(expand("results/correspondence/{model}/correspondence.parquet", model=MODELS))
OUTPUTS.extend(expand("results/correspondence/{model}/table1.parquet", model=MODELS))
OUTPUTS.extend(expand("results/correspondence/{model}/{figure}.png", model=MODELS, figure=["table1", "delta_by_layer", "occluders"]))
