"""Architecture comparison (Sec. 4.1, Fig. 6): filter spectra, dead maps, FLOPs, geometry, figures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.models as tvm
from torch import nn

from convviz.compare import (
    ActivationStats,
    CompareOutputs,
    compare_models,
    count_macs,
    high_frequency_fraction,
    layer_geometry,
    normalise_filters,
    summarise,
    top9_panel,
)
from convviz.models.checkpoint import save_checkpoint
from convviz.models.registry import build_model


def gaussian_blob(k=11, sigma=2.0):
    r = np.arange(k) - (k - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return torch.tensor(np.stack([g, g, g]), dtype=torch.float32)


def test_smooth_filters_are_low_frequency_and_checkerboards_and_noise_high():
    checker = torch.tensor(np.indices((7, 7)).sum(0) % 2 * 2 - 1.0).expand(3, 7, 7)
    filters = torch.stack([gaussian_blob(7, 1.5), checker.float(), torch.zeros(3, 7, 7)])
    hf = high_frequency_fraction(filters, cutoff=0.5)
    # The blob's small share is the edge of its mean-removed pedestal; it is far from "mostly".
    assert hf[0] < 0.15 and hf[1] > 0.9 and hf[2] == 0.0
    noise = high_frequency_fraction(torch.randn(500, 3, 7, 7, generator=torch.Generator().manual_seed(0)), cutoff=0.5)
    # White noise spreads its energy evenly: the area of the spectrum beyond r > 0.5 is ~80%.
    assert 0.7 < noise.mean() < 0.9
    # A lower cut-off can only count more energy as high-frequency.
    assert (high_frequency_fraction(filters, cutoff=0.25) >= hf - 1e-9).all()


def test_each_filter_is_normalised_on_its_own():
    filters = torch.stack([gaussian_blob(5) * 100, -gaussian_blob(5) * 0.01, torch.ones(3, 5, 5)])
    shown = normalise_filters(filters)
    assert shown.dtype == np.uint8 and shown.shape == (3, 3, 5, 5)
    assert shown[0].min() == 0 and shown[0].max() == 255 and shown[1].min() == 0 and shown[1].max() == 255
    assert (shown[2] == 128).all()  # a constant filter is mid-grey


def test_activation_stats_match_a_brute_force_count_over_batches():
    torch.manual_seed(0)
    batches = [torch.relu(torch.randn(4, 6, 5, 5)) for _ in range(3)]
    for b in batches:
        b[:, 2] = 0  # channel 2 never fires
    batches[1][0, 4] = 0
    stats = ActivationStats()
    for b in batches:
        stats.add("conv", b)
        stats.add("fc", b.mean(dim=(2, 3)))
    everything = torch.cat(batches)
    dead = [c for c in range(6) if not (everything[:, c] > 0).any()]
    result = stats.result()
    assert dead == [2]
    assert result["conv"]["dead_channels"] == 1 and result["conv"]["dead_share"] == pytest.approx(1 / 6)
    assert result["conv"]["sparsity"] == pytest.approx(float((everything <= 0).float().mean()))
    assert result["fc"]["channels"] == 6 and result["fc"]["dead_channels"] == 1


def test_macs_match_a_hand_count_and_torchvisions_published_figures():
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2, stride=2), nn.Flatten(), nn.Linear(4 * 2 * 2, 5))
    # conv1: 4*6*6 outputs x 3*3*3; grouped conv2: 4*2*2 outputs x (4/2)*3*3; fc: 5 x 16
    assert count_macs(tiny, 8) == {"macs": 144 * 27 + 16 * 18 + 5 * 16, "flops": 2 * (144 * 27 + 16 * 18 + 5 * 16),
                                   "params": sum(p.numel() for p in tiny.parameters())}
    for build, weights in ((tvm.alexnet, tvm.AlexNet_Weights.IMAGENET1K_V1), (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1)):
        cost = count_macs(build(), 224)
        assert cost["macs"] / 1e9 == pytest.approx(weights.meta["_ops"], abs=0.0015)  # torchvision's GFLOPS are MACs
        assert cost["params"] == weights.meta["num_params"]


def test_geometry_reproduces_the_papers_first_layers():
    alex = layer_geometry(build_model("alexnet", 10, 224), "alexnet", 224).set_index("layer")
    zf = layer_geometry(build_model("zfnet", 10, 224), "zfnet", 224).set_index("layer")
    assert alex.loc["conv1", ["kernel", "conv_stride", "rf_px", "output_size"]].tolist() == ["11x11", 4, 11, "55x55"]
    # Fig. 3: 96 7x7 filters at stride 2 (110x110 maps), then 3x3/2 pooling and 256 5x5/2 (26x26).
    assert zf.loc["conv1", ["kernel", "conv_stride", "output_size", "channels"]].tolist() == ["7x7", 2, "110x110", 96]
    assert zf.loc["conv2", ["kernel", "conv_stride", "pooling", "output_size"]].tolist() == ["5x5", 2, "max 3x3/2", "26x26"]
    assert zf.loc["fc7", "kernel"] == "fc" and zf.loc["fc7", "jump_px"] == 0


def fake_top9(channels=(1, 4, 7, 9, 12), side=5, layers=("conv1", "conv2")):
    """top9_arrays.npz content in rule top9's format, each tile a distinct flat colour."""
    arrays = {}
    for layer in layers:
        n = len(channels)
        tiles = (np.arange(n * 9, dtype=np.uint8)[:, None, None, None] * 5).repeat(3, 1).repeat(side, 2).repeat(side, 3)
        arrays[f"{layer}__channels"] = np.array(channels, dtype=np.int64)
        arrays[f"{layer}__projections"] = tiles.reshape(n, 9, 3, side, side)
        arrays[f"{layer}__patches"] = tiles.reshape(n, 9, 3, side, side)
    return arrays


def test_top9_panel_shows_the_same_seeded_number_of_maps_as_3x3_blocks():
    arrays = fake_top9()
    image, shown, projected = top9_panel(arrays, "conv1", 4, seed=0, model_name="zfnet")
    assert (shown, projected) == (4, 5)
    # 2x2 maps of 3x3 tiles of 5 px, 1 px between tiles, 4 px between maps.
    block = 3 * 5 + 2
    assert image.shape == (2 * block + 4, 2 * block + 4, 3)
    again, _, _ = top9_panel(arrays, "conv1", 4, seed=0, model_name="zfnet")
    assert np.array_equal(image, again)
    first_tiles = {int(image[0, 0, 0]), int(image[0, block + 4, 0])}
    assert first_tiles <= {int(arrays["conv1__projections"][i, 0, 0, 0, 0]) for i in range(5)}
    assert top9_panel(arrays, "conv1", 50, 0, "zfnet")[1] == 5  # fewer maps projected: all of them
    assert top9_panel(arrays, "fc6", 4, 0, "zfnet") is None


def test_summary_names_the_models_the_numbers_favour():
    rows = []
    for model, hf, dead, top1 in (("alexnet", 0.8, 10, 0.3), ("zfnet", 0.2, 2, 0.4)):
        rows += [(model, "conv1", "hf_share", hf), (model, "conv1", "channels", 64), (model, "conv1", "dead_channels", dead),
                 (model, "conv1", "dead_share", dead / 64), (model, "conv2", "channels", 64), (model, "conv2", "dead_channels", 0),
                 (model, "all", "val_top1", top1), (model, "all", "val_top5", 0.9), (model, "all", "params", 1e6),
                 (model, "all", "flops", 2e9)]
    summary = summarise(pd.DataFrame(rows, columns=["model", "layer", "metric", "value"]), 0.5)
    assert summary["cleanest_first_layer"] == "zfnet" and summary["fewest_dead_units"] == "zfnet"
    assert summary["best_model"] == "zfnet"
    assert summary["models"]["alexnet"]["dead_share_all_layers"] == pytest.approx(10 / 128)
    assert summary["zfnet_vs_alexnet"] == {"cleaner_first_layer": True, "fewer_dead_units": True}


def test_compare_models_writes_every_output_and_recomputes_training_accuracy(tiny_dataset, tmp_path):
    from convviz.analysis import open_split
    from convviz.train import evaluate

    checkpoints, top9 = {}, {}
    for name, arch in (("lenet", {}), ("alexnet", {"fc_width": 16})):
        torch.manual_seed(0)
        model = build_model(name, 3, 64, arch)
        checkpoints[name] = tmp_path / f"{name}.pt"
        save_checkpoint(checkpoints[name], name, model, epoch=1, num_classes=3, input_size=64, arch_cfg=arch)
        top9[name] = tmp_path / f"{name}_top9.npz"
        np.savez(top9[name], **fake_top9(layers=("conv1",)))  # conv2 not mined: a placeholder panel
    outputs = CompareOutputs(*(tmp_path / f for f in ("c.parquet", "g.parquet", "g.md", "f.png", "s.png", "t.png", "s.md", "s.json")))
    settings = {"split": "val", "hf_cutoff": 0.5, "hf_pad": 32, "top9_maps": 4, "seed": 0, "device": "cpu",
                "analysis": {"batch_size": 5, "threads": 1}}
    table = compare_models(checkpoints, top9, tiny_dataset, outputs, settings, log=lambda m: None)
    assert table.equals(pd.read_parquet(outputs.table))
    val = open_split(tiny_dataset, "val", 64)
    for name, path in checkpoints.items():
        from convviz.analysis import load_for_analysis

        model, _ = load_for_analysis(path)
        expected = evaluate(model, val, torch.device("cpu"), 4, amp=False)
        mine = table[(table["model"] == name) & (table["layer"] == "all")].set_index("metric")["value"]
        assert mine["val_top1"] == pytest.approx(expected["top1"]) and mine["val_top5"] == pytest.approx(expected["top5"])
        assert mine["params"] == sum(p.numel() for p in model.parameters())
    assert set(table.loc[table["metric"] == "dead_share", "layer"]) >= {"conv1", "conv2", "fc7", "fc4"}
    summary = json.loads(outputs.summary_json.read_text())
    assert set(summary["models"]) == {"lenet", "alexnet"}
    assert summary["best_model"] in outputs.summary_md.read_text()
    assert "| alexnet | conv1 | 11x11 | 4 |" in outputs.geometry_md.read_text()
    for figure in (outputs.filters, outputs.spectra, outputs.top9):
        assert figure.stat().st_size > 5_000


@pytest.mark.workflow
def test_smoke_run_compares_every_model(smoke_run):
    models = ["lenet", "alexnet", "zfnet", "resnet50"]
    table = pd.read_parquet(smoke_run / "results/compare/compare.parquet")
    assert list(table.columns) == ["model", "layer", "metric", "value"] and set(table["model"]) == set(models)
    for model in models:
        history = pd.read_parquet(smoke_run / f"results/models/{model}/history.parquet")
        final_val = history[history["split"] == "val"].sort_values("epoch")["top1"].iloc[-1]
        mine = table[(table["model"] == model) & (table["metric"] == "val_top1")]["value"].item()
        assert mine == pytest.approx(final_val)  # the same final.pt, evaluated again on val
    assert table.loc[table["metric"].isin(["dead_share", "sparsity", "hf_share"]), "value"].between(0, 1).all()
    geometry = pd.read_parquet(smoke_run / "results/compare/geometry.parquet")
    assert geometry.groupby("model").size().to_dict() == {"alexnet": 7, "lenet": 4, "resnet50": 6, "zfnet": 7}
    for figure in ("first_layer_filters.png", "filter_spectra.png", "top9_layers_1_2.png"):
        assert (smoke_run / "results/compare" / figure).stat().st_size > 10_000
    summary = json.loads((smoke_run / "results/compare/compare_summary.json").read_text())
    assert summary["best_model"] in models and "zfnet_vs_alexnet" in summary
