"""Rule correspondence: Delta of masked parts vs random masks per layer (Table 1, Fig. 8)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

import torch  # noqa: E402

from convviz.correspondence import run_correspondence  # noqa: E402
from convviz.logs import redirect_log  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    torch.set_num_threads(sm.threads)
    run_correspondence(
        sm.input.model,
        Path(sm.input.manifest).parent,
        sm.params.settings,
        {k: getattr(sm.output, k) for k in ("deltas", "table", "table_figure", "bars", "examples")},
        log,
    )
