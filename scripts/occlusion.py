"""Rule occlusion: occlusion sensitivity maps and their localisation score (Fig. 7)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

import torch  # noqa: E402

from convviz.logs import redirect_log  # noqa: E402
from convviz.occlusion import OcclusionOutputs, run_occlusion  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    torch.set_num_threads(sm.threads)
    run_occlusion(
        sm.input.model,
        Path(sm.input.manifest).parent,
        sm.params.settings,
        OcclusionOutputs(table=sm.output.table, localisation=sm.output.localisation, figures=sm.output.figures),
        log,
    )
