"""Rule train: train one model, writing Fig. 4 checkpoints, final weights and history."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821  (convviz without installing)

import torch  # noqa: E402

from convviz.logs import redirect_log  # noqa: E402
from convviz.machine import keep_freed_memory  # noqa: E402
from convviz.train import TrainOutputs, train_model  # noqa: E402

sm = snakemake  # noqa: F821
with redirect_log(sm.log[0]) as log:
    torch.set_num_threads(sm.threads)
    if keep_freed_memory():
        log("allocator: freed memory is kept for reuse (no page fault per fresh tensor page)")
    outputs = TrainOutputs(
        final=Path(sm.output.final),
        history=Path(sm.output.history),
        checkpoint_dir=Path(sm.output.checkpoints),
        resume=Path(sm.params.resume),
        curves=Path(sm.output.curves),
    )
    train_model(
        sm.wildcards.model,
        Path(sm.input.manifest).parent,
        outputs,
        arch_cfg=sm.params.arch,
        train_cfg=sm.params.train,
        seed=sm.params.seed,
        device=sm.params.device,
        log=log,
    )
