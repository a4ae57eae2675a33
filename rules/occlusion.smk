# Occlusion sensitivity (Sec. 4.2, Fig. 7): a mean-colour square slides over a few images; per
# position the top conv layer's strongest map, P(true class) and the most probable class.


rule occlusion:
    input:
        model="results/models/{model}/final.pt",
        manifest=f"{DATA}/manifest.parquet",
        parts=f"{DATA}/parts.parquet",
        meta=f"{DATA}/dataset.json",
        lib=lib("occlusion.py", "incremental.py", "winograd.py", "deconv.py", "deconv_window.py", "display.py", "analysis.py"),
    output:
        table="results/occlusion/{model}/occlusion.parquet",
        localisation="results/occlusion/{model}/occlusion_localisation.parquet",
        figures=report(
            directory("results/occlusion/{model}/figures"),
            patterns=["{image}.png"],
            caption="../report/occlusion.rst",
            category="Occlusion sensitivity (Fig. 7)",
            subcategory="{model}",
        ),
    log:
        "results/logs/occlusion/{model}.log",
    benchmark:
        "results/benchmarks/occlusion/{model}.tsv"
    params:
        settings=study_settings(config, "occlusion"),
    threads: config["analysis"]["threads"]
    resources:
        gpu=LOCAL_GPU,
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/occlusion.py"


OUTPUTS.extend(expand("results/occlusion/{model}/occlusion.parquet", model=MODELS))
OUTPUTS.extend(expand("results/occlusion/{model}/occlusion_localisation.parquet", model=MODELS))
