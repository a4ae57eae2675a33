"""Rule top9: per-layer top-9 deconvnet projections (Fig. 2) and the per-image view of one model."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

import torch  # noqa: E402

from convviz.logs import redirect_log  # noqa: E402
from convviz.top9 import Top9Outputs, run_top9  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    torch.set_num_threads(sm.threads)
    run_top9(
        sm.wildcards.model,
        sm.input.model,
        Path(sm.input.manifest).parent,
        Top9Outputs(
            table=sm.output.table,
            arrays=sm.output.arrays,
            figures=sm.output.figures,
            per_image_table=sm.output.per_image_table,
            per_image_figures=sm.output.per_image_figures,
        ),
        sm.params.settings,
        log,
    )
