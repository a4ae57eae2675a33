"""Rule transfer_summary: all transfer rows in one table, mean ± std beside the paper, figures."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

from convviz.logs import redirect_log  # noqa: E402
from convviz.transfer_summary import TransferSummaryOutputs, summarise_transfer  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    pairs = [(target, model) for target in sm.params.targets for model in sm.params.models]
    summarise_transfer(
        dict(zip(pairs, sm.input.tables)),
        dict(zip(sm.params.models, sm.input.histories)),
        TransferSummaryOutputs(
            table=Path(sm.output.table),
            accuracy=Path(sm.output.accuracy),
            markdown=Path(sm.output.markdown),
            summary_json=Path(sm.output.summary_json),
            figures={target: Path(path) for target, path in zip(sm.params.targets, sm.output.figures)},
        ),
        log,
    )
