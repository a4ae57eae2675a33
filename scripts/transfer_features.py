"""Rule transfer_features: pooled features of every target image at every analysis layer (cached)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

import torch  # noqa: E402

from convviz.logs import redirect_log  # noqa: E402
from convviz.transfer import extract_target_features  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    torch.set_num_threads(sm.threads)
    extract_target_features(sm.input.model, Path(sm.input.manifest).parent, sm.output.features, sm.params.settings, log)
