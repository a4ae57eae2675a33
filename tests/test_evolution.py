"""Rule evolution (Fig. 4): the same maps at every epoch, each epoch's strongest activation found
by brute force, checkpoints discovered by epoch, and the smoke-run outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from convviz.analysis import open_split
from convviz.evolution import EvolutionOutputs, checkpoint_epochs, evolution_channels, run_evolution
from convviz.models.checkpoint import CheckpointError, save_checkpoint
from convviz.models.registry import build_model, layer_modules
from convviz.top9 import projected_channels

SETTINGS = {
    "split": "val",
    "images": "all",
    "maps_per_layer": 2,
    "layers": ["conv1", "conv2", "fc4"],
    "method": "auto",
    "analysis": {"batch_size": 5, "threads": 1},
    "seed": 0,
    "device": "cpu",
    "top9_project_maps": 4,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """lenet 'checkpoints' at epochs 1, 3 and 10: differently seeded weights."""
    folder = tmp_path_factory.mktemp("ckpt")
    for epoch in (10, 1, 3):
        torch.manual_seed(epoch)
        model = build_model("lenet", 3, 64)
        save_checkpoint(folder / f"epoch_{epoch:03d}.pt", "lenet", model, epoch=epoch, num_classes=3, input_size=64, arch_cfg={})
    (folder / "notes.txt").write_text("not a checkpoint")
    return folder


def test_checkpoints_are_found_in_epoch_order(checkpoints, tmp_path):
    assert [e for e, _ in checkpoint_epochs(checkpoints)] == [1, 3, 10]
    with pytest.raises(CheckpointError, match="no epoch_NNN.pt checkpoints in .*rerun rule train"):
        checkpoint_epochs(tmp_path)


def test_evolution_maps_are_a_seeded_subset_of_the_maps_top9_projects():
    pool = projected_channels(0, "zfnet", "conv2", 256, 16)
    chosen = evolution_channels({"seed": 0, "maps_per_layer": 6, "top9_project_maps": 16}, "zfnet", "conv2", 256)
    assert len(chosen) == 6 and set(chosen) <= set(pool)
    assert chosen == evolution_channels({"seed": 0, "maps_per_layer": 6, "top9_project_maps": 16}, "zfnet", "conv2", 256)


def test_each_epoch_records_the_same_maps_strongest_activation(checkpoints, tiny_dataset, tmp_path):
    out = EvolutionOutputs(str(tmp_path / "e.parquet"), str(tmp_path / "e.npz"), str(tmp_path / "e.png"))
    run_evolution("lenet", checkpoints, tiny_dataset, out, SETTINGS, log=lambda m: None)
    table = pd.read_parquet(out.table)
    arrays = np.load(out.arrays)
    assert arrays["epochs"].tolist() == [1, 3, 10]
    dataset = open_split(tiny_dataset, "val", 64)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ids = dataset.manifest["image_id"].tolist()
    for epoch in (1, 3, 10):
        torch.manual_seed(epoch)
        model = build_model("lenet", 3, 64).eval()
        for layer, module in layer_modules(model, "lenet", SETTINGS["layers"]).items():
            acts = []
            handle = module.register_forward_hook(lambda m, a, o: acts.append(o.detach()))
            with torch.no_grad():
                model(images)
            handle.remove()
            peak = acts[0].flatten(2).amax(2) if acts[0].ndim == 4 else acts[0]
            rows = table[(table["epoch"] == epoch) & (table["layer"] == layer)]
            assert rows["channel"].tolist() == arrays[f"{layer}__channels"].tolist()  # same maps every epoch
            for row in rows.itertuples():
                best = int(torch.argmax(peak[:, row.channel]))  # first maximum: lowest index on ties
                assert row.image_id == ids[best]
                assert row.activation == pytest.approx(float(peak[best, row.channel]), rel=1e-6)
    assert arrays["conv2__projections"].shape[:2] == (2, 3)
    assert (tmp_path / "e.png").stat().st_size > 0


@pytest.mark.workflow
def test_smoke_run_writes_evolution_for_every_model(smoke_run):
    for model in ["lenet", "alexnet", "zfnet", "resnet50"]:
        out = smoke_run / "results/evolution" / model
        table = pd.read_parquet(out / "evolution.parquet")
        assert list(table.columns) == ["model", "layer", "channel", "epoch", "image_id", "activation", "y", "x"]
        assert sorted(table["epoch"].unique()) == [1, 2]  # the smoke config trains 2 epochs
        assert (out / "evolution.png").stat().st_size > 0
