# The last step (include this file last): every file behind the default target, assembled into
# one self-contained HTML page laid out like the paper (results/report/index.html).
import glob
import os


REPORT = "results/report/index.html"


def jobs_behind(targets):
    """Every output and benchmark file of the jobs that produce `targets`.

    The report takes these as its inputs, so it reads only what this configuration's jobs wrote
    (never a leftover figure from an earlier config), and it reruns whenever one of them changes.
    """
    outputs, benchmarks = [], []
    for target in targets:
        if target == REPORT:
            continue
        producer = next((r for r in workflow.rules if r.name not in ("all", "report") and r.is_producer(target)), None)
        if producer is None:  # a source file: the report reads it as it is
            outputs.append(target)
            continue
        wildcards = producer.get_wildcards(target)
        outputs.extend(str(f) for f in producer.expand_output(wildcards)[0])
        benchmark = producer.expand_benchmark(wildcards)
        if benchmark is not None:
            benchmarks.append(str(benchmark))
    return list(dict.fromkeys(outputs)), list(dict.fromkeys(benchmarks))


def report_inputs(wildcards):
    """Evaluated when the DAG is built, after every rules/*.smk has added to OUTPUTS."""
    outputs, benchmarks = jobs_behind(OUTPUTS)
    return {
        "outputs": outputs,
        "benchmarks": benchmarks,
        # The README's measured figures and the benchmarks/*.py results (made outside the
        # workflow, by `make benchmarks`) for the benchmarks section, where they exist.
        "readme": [p for p in ["README.md"] if os.path.exists(p)],
        "benchmark_results": sorted(glob.glob("results/benchmarks/*.json")),
    }


rule report:
    input:
        unpack(report_inputs),
        lib=lib(
            "report/__init__.py",
            "report/html.py",
            "report/inputs.py",
            "report/paper.py",
            "report/sections.py",
            "report/units.py",
            "report/assets/page.html",
            "report/assets/style.css",
            "report/assets/browser.js",
        ),
    output:
        html=report(REPORT, caption="../report/report.rst", category="Report"),
    log:
        "results/logs/report/report.log",
    benchmark:
        "results/benchmarks/report/report.tsv"
    params:
        # The page shows the configuration used, so any config change rebuilds it.
        config=config,
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/report.py"


OUTPUTS.append(REPORT)
