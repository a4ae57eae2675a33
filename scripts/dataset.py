"""Rule dataset / target_dataset: generate or export a dataset into the common on-disk form."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

from convviz.data.build import build_dataset  # noqa: E402
from convviz.logs import redirect_log  # noqa: E402

with redirect_log(snakemake.log[0]) as log:  # noqa: F821
    build_dataset(snakemake.params.settings, Path(snakemake.output.manifest).parent, log=log)  # noqa: F821
