# The last step (include this file last): every file behind the default target, assembled into
# one self-contained HTML page laid out like the paper (results/report/index.html).
# Its inputs come from report_inputs (rules/common.smk): every file the default target's jobs wrote.


rule report:
    input:
        unpack(report_inputs),
        lib=lib(
            "report/__init__.py",
            "report/html.py",
            "report/inputs.py",
            "paper.py",
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
