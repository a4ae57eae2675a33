"""Rule evolution: how a seeded subset of feature maps develops over the training epochs (Fig. 4)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

import torch  # noqa: E402

from convviz.evolution import EvolutionOutputs, run_evolution  # noqa: E402
from convviz.logs import redirect_log  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    torch.set_num_threads(sm.threads)
    run_evolution(
        sm.wildcards.model,
        sm.input.checkpoints,
        Path(sm.input.manifest).parent,
        EvolutionOutputs(table=sm.output.table, arrays=sm.output.arrays, figure=sm.output.figure),
        sm.params.settings,
        log,
    )
