"""Rule report: assemble every output of the default target into results/report/index.html."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

from convviz.logs import redirect_log  # noqa: E402
from convviz.report import ReportInputs, build_report, software_versions  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    inputs = ReportInputs(
        files=list(sm.input.outputs),
        models=list(sm.params.config["models"]),
        benchmarks=list(sm.input.benchmarks),
        readme=Path(sm.input.readme[0]) if sm.input.readme else None,
        benchmark_results=list(sm.input.benchmark_results),
    )
    software = software_versions(repo=Path(sm.scriptdir).parent)
    build_report(inputs, sm.params.config, sm.output.html, software=software, log=log)
