# Architecture comparison across every trained model (Sec. 4.1, Fig. 6).


rule compare:
    input:
        models=expand("results/models/{model}/final.pt", model=MODELS),
        top9=expand("results/top9/{model}/top9_arrays.npz", model=MODELS),
        manifest=f"{DATA}/manifest.parquet",
        meta=f"{DATA}/dataset.json",
        lib=lib("compare.py", "layer_features.py", "receptive.py", "display.py", "analysis.py"),
    output:
        table="results/compare/compare.parquet",
        geometry="results/compare/geometry.parquet",
        geometry_md="results/compare/geometry.md",
        summary_md="results/compare/compare_summary.md",
        summary_json="results/compare/compare_summary.json",
        filters=report(
            "results/compare/first_layer_filters.png", caption="../report/compare.rst", category="Architecture comparison (Fig. 6)"
        ),
        spectra=report(
            "results/compare/filter_spectra.png", caption="../report/compare.rst", category="Architecture comparison (Fig. 6)"
        ),
        top9=report(
            "results/compare/top9_layers_1_2.png", caption="../report/compare.rst", category="Architecture comparison (Fig. 6)"
        ),
    log:
        "results/logs/compare/compare.log",
    benchmark:
        "results/benchmarks/compare/compare.tsv"
    params:
        settings=study_settings(config, "compare"),
        models=MODELS,
    threads: config["analysis"]["threads"]
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/compare.py"


OUTPUTS.extend(
    [
        "results/compare/compare.parquet",
        "results/compare/compare_summary.md",
        "results/compare/first_layer_filters.png",
        "results/compare/top9_layers_1_2.png",
    ]
)
