# Per-layer top-9 visualisations (paper Sec. 4, Fig. 2) and the per-image view, per model.


rule top9:
    input:
        model="results/models/{model}/final.pt",
        manifest=f"{DATA}/manifest.parquet",
        meta=f"{DATA}/dataset.json",
        lib=lib("top9.py", "topk.py", "deconv.py", "deconv_graph.py", "winograd.py", "deconv_window.py", "receptive.py", "display.py", "plots.py", "analysis.py"),
    output:
        table="results/top9/{model}/top9.parquet",
        arrays="results/top9/{model}/top9_arrays.npz",
        figures=report(
            directory("results/top9/{model}/figures"),
            patterns=["{layer}.png"],
            caption="../report/top9.rst",
            category="Top-9 per layer (Fig. 2)",
            subcategory="{model}",
        ),
        per_image_table="results/top9/{model}/top9_per_image.parquet",
        per_image_figures=report(
            directory("results/top9/{model}/per_image"),
            patterns=["{image}.png"],
            caption="../report/top9_per_image.rst",
            category="Top-9 per image",
            subcategory="{model}",
        ),
    log:
        "results/logs/top9/{model}.log",
    benchmark:
        "results/benchmarks/top9/{model}.tsv"
    params:
        settings=study_settings(config, "top9"),
    threads: config["analysis"]["threads"]
    resources:
        gpu=LOCAL_GPU,
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    script:
        "../scripts/top9.py"


OUTPUTS.extend(expand("results/top9/{model}/top9.parquet", model=MODELS))
OUTPUTS.extend(expand("results/top9/{model}/top9_per_image.parquet", model=MODELS))
