"""Rule compare: first-layer filters, early top-9 and per-layer measures of every model (Fig. 6)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

import torch  # noqa: E402

from convviz.compare import CompareOutputs, compare_models  # noqa: E402
from convviz.logs import redirect_log  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    torch.set_num_threads(sm.threads)
    out = sm.output
    compare_models(
        dict(zip(sm.params.models, sm.input.models)),
        dict(zip(sm.params.models, sm.input.top9)),
        Path(sm.input.manifest).parent,
        CompareOutputs(
            table=out.table, geometry=out.geometry, geometry_md=out.geometry_md, filters=out.filters,
            spectra=out.spectra, top9=out.top9, summary_md=out.summary_md, summary_json=out.summary_json,
        ),
        sm.params.settings,
        log,
    )
