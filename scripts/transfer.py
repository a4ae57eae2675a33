"""Rule transfer: softmax/SVM probes on cached frozen features and the from-scratch baseline."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

import torch  # noqa: E402

from convviz.logs import redirect_log  # noqa: E402
from convviz.transfer import run_transfer  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    torch.set_num_threads(sm.threads)
    run_transfer(
        sm.wildcards.model,
        sm.wildcards.target,
        sm.input.features,
        Path(sm.input.manifest).parent,
        sm.input.model,
        sm.params.settings,
        sm.params.train,
        sm.output.table,
        log,
    )
