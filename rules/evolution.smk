# Feature evolution during training (paper Sec. 4.1, Fig. 4), per model, from the kept checkpoints.


rule evolution:
    input:
        checkpoints="results/models/{model}/checkpoints",
        manifest=f"{DATA}/manifest.parquet",
        meta=f"{DATA}/dataset.json",
        lib=lib("evolution.py", "top9.py", "topk.py", "deconv.py", "deconv_graph.py", "winograd.py", "deconv_window.py", "receptive.py", "display.py", "plots.py", "analysis.py"),
    output:
        table="results/evolution/{model}/evolution.parquet",
        arrays="results/evolution/{model}/evolution_arrays.npz",
        figure=report(
            "results/evolution/{model}/evolution.png",
            caption="../report/evolution.rst",
            category="Feature evolution (Fig. 4)",
            subcategory="{model}",
        ),
    log:
        "results/logs/evolution/{model}.log",
    benchmark:
        "results/benchmarks/evolution/{model}.tsv"
    params:
        # The maps are chosen among those top9 projects, so its project_maps is part of the params.
        settings=study_settings(config, "evolution", top9_project_maps=config["top9"]["project_maps"]),
    threads: config["analysis"]["threads"]
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    script:
        "../scripts/evolution.py"


OUTPUTS.extend(expand("results/evolution/{model}/evolution.parquet", model=MODELS))
OUTPUTS.extend(expand("results/evolution/{model}/evolution.png", model=MODELS))
