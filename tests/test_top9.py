"""Rule top9 (Fig. 2): the table against brute force, projections and crops against direct
computation, display normalisation, small splits, bad layer names, and the smoke-run outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from convviz.analysis import open_split
from convviz.config import ConfigError, validate_config
from convviz.deconv import project
from convviz.display import GREY, canvas_side, contrast_normalise, crop_to_canvas
from convviz.models.registry import build_model, layer_modules
from convviz.receptive import RField, receptive_fields, unit_box
from convviz.top9 import K, analysis_layers, mine_split, per_image_view, project_layer, top9_table

MODELS = ["lenet", "alexnet", "zfnet", "resnet50"]


@pytest.fixture(scope="module")
def lenet_setup(tiny_dataset):
    torch.manual_seed(0)
    model = build_model("lenet", 3, 64).eval().requires_grad_(False)
    dataset = open_split(tiny_dataset, "val", 64)  # 12 images
    return model, dataset


def test_top9_table_equals_brute_force_over_every_image(lenet_setup):
    model, dataset = lenet_setup
    layers = ["conv1", "conv2", "fc3"]
    mined = mine_split(model, "lenet", dataset, layers, 5, torch.device("cpu"), log=lambda m: None)
    fields = receptive_fields(model, layers, 64, "lenet")
    table = top9_table("lenet", dataset, mined, fields)
    modules = layer_modules(model, "lenet", layers)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ids = dataset.manifest["image_id"].tolist()
    for layer, module in modules.items():
        acts = []
        handle = module.register_forward_hook(lambda m, a, out: acts.append(out.detach()))
        with torch.no_grad():
            model(images)
        handle.remove()
        maps = acts[0]
        rows = table[table["layer"] == layer]
        for channel in (0, maps.shape[1] - 1):
            got = rows[rows["channel"] == channel].sort_values("rank")
            spatial = maps[:, channel].reshape(len(images), -1)
            peak = spatial.max(dim=1).values
            order = sorted(range(len(images)), key=lambda i: (-float(peak[i]), i))[:K]
            assert got["image_id"].tolist() == [ids[i] for i in order]
            assert np.allclose(got["activation"], [float(peak[i]) for i in order], rtol=1e-6)
            if maps.ndim == 4:
                width = maps.shape[-1]
                flat = [int(torch.nonzero(spatial[i] == peak[i])[0]) for i in order]
                assert got["y"].tolist() == [f // width for f in flat]
                assert got["x"].tolist() == [f % width for f in flat]
            for row in got.itertuples():
                assert (row.box_y0, row.box_x0, row.box_y1, row.box_x1) == unit_box(fields[layer], row.y, row.x, 64)


def test_projections_and_patches_are_each_units_own_projection_cropped_to_its_field(lenet_setup):
    model, dataset = lenet_setup
    layer, channels = "conv2", [3, 7]
    mined = mine_split(model, "lenet", dataset, [layer], 64, torch.device("cpu"), log=lambda m: None)
    field = receptive_fields(model, [layer], 64, "lenet")[layer]
    done = project_layer(model, "lenet", dataset, layer, mined[layer], field, channels, "explicit", torch.device("cpu"), 8, print)
    side = canvas_side(field, 64)
    assert done.projections.shape == done.patches.shape == (2, K, 3, side, side)
    values, index, ys, xs = mined[layer]
    for i, channel in enumerate(channels):
        for rank in (0, 4, 8):
            image_index, y, x = int(index[channel, rank]), int(ys[channel, rank]), int(xs[channel, rank])
            image = dataset[image_index][0].unsqueeze(0)
            alone = project(model, layer, image, [(0, channel, y, x)], method="general", spec="lenet")
            box = [unit_box(field, y, x, 64)]
            expected = contrast_normalise(crop_to_canvas(alone, box, field, [y], [x], 0.0))[0]
            assert np.abs(done.projections[i, rank].astype(int) - expected.astype(int)).max() <= 1
            raw = crop_to_canvas(dataset.raw(image_index).unsqueeze(0).float(), box, field, [y], [x], float(GREY))
            assert np.array_equal(done.patches[i, rank], raw[0].to(torch.uint8).numpy())


def test_crop_sits_where_the_unclipped_receptive_field_is_and_the_rest_is_fill():
    field = RField(size=7, stride=2, start=0.0, output_size=(30, 30), reach=None)  # first pixel -3
    image = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64).expand(1, 3, 64, 64)
    box = [unit_box(field, 0, 0, 64)]
    assert box == [(0, 0, 4, 4)]
    out = crop_to_canvas(image, box, field, [0], [0], fill=-1.0)
    assert out.shape == (1, 3, 7, 7)
    assert torch.equal(out[0, 0, 3:, 3:], image[0, 0, :4, :4])
    assert (out[0, 0, :3, :] == -1).all() and (out[0, 0, :, :3] == -1).all()
    inner = crop_to_canvas(image, [unit_box(field, 10, 5, 64)], field, [10], [5], fill=-1.0)
    assert torch.equal(inner[0, 0], image[0, 0, 17:24, 7:14])


def test_contrast_normalisation_puts_zero_at_grey_and_each_projections_peak_at_the_ends():
    p = torch.zeros(3, 3, 4, 4)
    p[0, 0, 0, 0], p[0, 1, 1, 1] = 2.0, -1.0
    p[1, 2, 3, 3] = -1e-6
    shown = contrast_normalise(p)
    assert shown.dtype == np.uint8
    assert shown[0, 0, 0, 0] == 255 and shown[0, 1, 1, 1] == 64 and shown[0, 2, 2, 2] == 128
    assert shown[1, 2, 3, 3] == 0  # a faint projection is scaled by its own peak
    assert (shown[2] == 128).all()  # all-zero stays flat grey


def test_a_split_with_fewer_than_nine_images_works_and_says_so(tiny_dataset):
    torch.manual_seed(1)
    model = build_model("lenet", 3, 64).eval().requires_grad_(False)
    full = open_split(tiny_dataset, "val", 64)
    small = open_split(tiny_dataset, None, 64)
    small.__init__(tiny_dataset, None, 64, manifest=full.manifest.iloc[:5])
    messages = []
    mined = mine_split(model, "lenet", small, ["conv1"], 4, torch.device("cpu"), log=messages.append)
    assert any("only 5 images, fewer than 9" in m for m in messages)
    field = receptive_fields(model, ["conv1"], 64, "lenet")["conv1"]
    table = top9_table("lenet", small, mined, {"conv1": field})
    assert table.groupby("channel")["rank"].max().eq(5).all()
    done = project_layer(model, "lenet", small, "conv1", mined["conv1"], field, [0], "explicit", torch.device("cpu"), 8, print)
    assert (done.projections[0, 5:] == GREY).all() and (done.patches[0, 5:] == GREY).all()


def test_an_unknown_layer_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"config key 'top9.layers': unknown layer\(s\) \['conv9'\] for lenet; valid layers are \['conv1', 'conv2', 'fc3', 'fc4'\]"):
        analysis_layers("lenet", ["conv1", "conv9"])
    config = {"models": ["lenet", "zfnet"], "top9": {"layers": ["conv1", "conv5"]}}
    with pytest.raises(ConfigError, match=r"'top9.layers': unknown layer\(s\) \['conv5'\] for lenet"):
        validate_config(config)


def test_figure_maps_beyond_the_projected_maps_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'top9.figure_maps': 20 exceeds top9.project_maps \(8\)"):
        validate_config({"top9": {"project_maps": 8, "figure_maps": 20}})


@pytest.mark.parametrize("name", ["lenet", "resnet50"])
def test_per_image_view_ranks_each_images_strongest_maps(tiny_dataset, name):
    torch.manual_seed(0)
    model = build_model(name, 3, 64).eval().requires_grad_(False)
    dataset = open_split(tiny_dataset, "val", 64)
    images = torch.stack([dataset[i][0] for i in (0, 5)])
    layers = ["conv1", "fc4"] if name == "lenet" else ["conv1", "layer4"]
    table, shown = per_image_view(model, name, images, ["a", "b"], layers, "general", torch.device("cpu"), 8, print)
    modules = layer_modules(model, name, layers)
    for layer, module in modules.items():
        acts = []
        handle = module.register_forward_hook(lambda m, a, out: acts.append(out.detach().clone()))
        with torch.no_grad():
            model(images)
        handle.remove()
        peak = acts[0].flatten(2).amax(2) if acts[0].ndim == 4 else acts[0]
        k = min(K, peak.shape[1])  # lenet conv1 has only 6 maps
        for i, image_id in enumerate(["a", "b"]):
            rows = table[(table["layer"] == layer) & (table["image_id"] == image_id)].sort_values("rank")
            assert rows["channel"].tolist() == peak[i].topk(k).indices.tolist()
            assert np.allclose(rows["activation"], peak[i].topk(k).values.numpy(), rtol=1e-5)
        assert shown[layer].shape == (2, K, 3, 64, 64)
        assert (shown[layer][:, k:] == GREY).all()


@pytest.mark.workflow
def test_smoke_run_writes_top9_tables_arrays_and_figures(smoke_run):
    from convviz.layer_names import ANALYSIS_LAYERS

    for model in MODELS:
        out = smoke_run / "results/top9" / model
        table = pd.read_parquet(out / "top9.parquet")
        assert list(table.columns) == ["model", "layer", "channel", "rank", "image_id", "activation", "y", "x", "box_y0", "box_x0", "box_y1", "box_x1"]
        assert list(dict.fromkeys(table["layer"])) == list(ANALYSIS_LAYERS[model])
        assert table.groupby(["layer", "channel"])["image_id"].nunique().eq(K).all()  # 9 distinct images
        assert ((table["box_y1"] > table["box_y0"]) & (table["box_x1"] > table["box_x0"])).all()
        arrays = np.load(out / "top9_arrays.npz")
        for layer in ANALYSIS_LAYERS[model]:
            assert arrays[f"{layer}__projections"].shape == arrays[f"{layer}__patches"].shape
            assert arrays[f"{layer}__projections"].shape[:2] == (len(arrays[f"{layer}__channels"]), K)
            assert (out / "figures" / f"{layer}.png").stat().st_size > 0
        per_image = pd.read_parquet(out / "top9_per_image.parquet")
        assert per_image["image_id"].nunique() == 2 and len(list((out / "per_image").glob("*.png"))) == 2


@pytest.mark.parametrize("bad", ["missing", "corrupt"])
def test_a_bad_per_image_file_fails_before_mining_naming_its_key(tmp_path, tiny_dataset, monkeypatch, bad):
    """top9.per_image.paths is read before the mining pass: a wrong path or an unreadable file is
    named with its config key instead of failing after every layer was mined and projected."""
    import convviz.top9 as top9
    from convviz.config import study_settings
    from convviz.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    checkpoint = tmp_path / "lenet.pt"
    save_checkpoint(checkpoint, "lenet", build_model("lenet", 3, 64), epoch=1, num_classes=3, input_size=64, arch_cfg={})
    path = tmp_path / "cat.png"
    if bad == "corrupt":
        path.write_bytes(b"not a png at all")
    settings = study_settings(validate_config({"top9": {"per_image": {"paths": [str(path)]}}}), "top9")

    def mining(*args, **kwargs):
        raise AssertionError("mined before checking the per-image files")

    monkeypatch.setattr(top9, "mine_split", mining)
    outputs = top9.Top9Outputs(*(str(tmp_path / name) for name in ("t.parquet", "a.npz", "figs", "p.parquet", "per")))
    with pytest.raises(ValueError, match=r"config key 'top9.per_image.paths\[0\]'.*cat.png"):
        top9.run_top9("lenet", checkpoint, tiny_dataset, outputs, settings, log=lambda m: None)


def test_a_feature_map_that_never_activates_is_named_in_the_log_and_the_figure(tmp_path, tiny_dataset, monkeypatch):
    """A dead map's "top 9" are ties at 0 and its projections blank: the figure's label and the
    log say it never activates on the split, rather than showing arbitrary images as its best."""
    import convviz.plots as plots
    import convviz.top9 as top9
    from convviz.config import study_settings
    from convviz.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("lenet", 3, 64)
    conv1 = model.features[0]
    with torch.no_grad():  # channel 2 of conv1: -1 everywhere before the ReLU
        conv1.weight[2] = 0
        conv1.bias[2] = -1
    checkpoint = tmp_path / "lenet.pt"
    save_checkpoint(checkpoint, "lenet", model, epoch=1, num_classes=3, input_size=64, arch_cfg={})
    settings = study_settings(validate_config({"top9": {"layers": ["conv1"], "project_maps": "all", "figure_maps": "all",
                                                        "per_image": {"count": 0}}}), "top9")
    titles = {}

    def keep_titles(fig, path):
        titles[str(path)] = [ax.get_title() for ax in fig.axes]

    monkeypatch.setattr(plots, "save_figure", keep_titles)
    messages = []
    outputs = top9.Top9Outputs(*(str(tmp_path / name) for name in ("t.parquet", "a.npz", "figs", "p.parquet", "per")))
    top9.run_top9("lenet", checkpoint, tiny_dataset, outputs, settings, log=messages.append)
    (figure,) = [t for p, t in titles.items() if p.endswith("conv1.png")]
    assert "conv1 #2: never active on this split" in figure
    assert "conv1 #1" in figure and not any(t.startswith("conv1 #1:") for t in figure)
    assert any("conv1: 1 of 6 feature maps never activate on this split" in m and "[2]" in m for m in messages)
