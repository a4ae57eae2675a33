"""Rule invariance: feature distances and P(true class) under translation, scale, rotation (Fig. 5)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

import torch  # noqa: E402

from convviz.invariance import run_invariance  # noqa: E402
from convviz.logs import redirect_log  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    torch.set_num_threads(sm.threads)
    run_invariance(
        sm.input.model,
        Path(sm.input.manifest).parent,
        sm.params.settings,
        sm.output.table,
        sm.output.figure,
        log,
    )
