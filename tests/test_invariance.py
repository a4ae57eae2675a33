"""Invariance study (Fig. 5): the transforms against independent oracles (roll, rot90, interpolate),
the batched sweep against a per-image loop, the rule's outputs on the smoke run."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from convviz.config import ConfigError, validate_config
from convviz.layer_features import forward_features
from convviz.invariance import (
    COLUMNS,
    TRANSFORMS,
    affine_theta,
    invariance_sweep,
    run_invariance,
    sweep_amounts,
    transform_images,
)
from convviz.models.checkpoint import save_checkpoint
from convviz.models.registry import build_model, get_spec

SIZE = 16
IDENTITY = {"translation": {0.0}, "scale": {1.0}, "rotation": {0.0, 360.0}}


def identity_rows(table):
    """Rows whose transform leaves the image as it is."""
    return table[[a in IDENTITY[t] for t, a in zip(table["transform"], table["amount"])]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def image():
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def apply(image, transform, amount, fill="mean"):
    return transform_images(image, affine_theta(transform, amount, SIZE).unsqueeze(0), fill)


@pytest.mark.parametrize("transform, amount", [("translation", 0.0), ("scale", 1.0), ("rotation", 0.0), ("rotation", 360.0)])
def test_zero_amounts_leave_the_image_unchanged(image, transform, amount):
    torch.testing.assert_close(apply(image, transform, amount), image, atol=1e-5, rtol=0)


def test_vertical_translation_shifts_rows_down_and_fills_with_the_mean_colour(image):
    moved = apply(image, "translation", 3.0)
    torch.testing.assert_close(moved[..., 3:, :], image[..., :-3, :], atol=1e-5, rtol=0)
    # Zero in normalised space is the dataset's mean colour.
    assert moved[..., :3, :].abs().max() < 1e-6
    up = apply(image, "translation", -2.0)
    torch.testing.assert_close(up[..., :-2, :], image[..., 2:, :], atol=1e-5, rtol=0)


def test_reflect_fill_mirrors_the_image_at_its_border(image):
    moved = apply(image, "translation", 3.0, fill="reflect")
    torch.testing.assert_close(moved[..., :3, :], image[..., :3, :].flip(-2), atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_turns_the_image_clockwise(image):
    turned = apply(image, "rotation", 90.0)
    torch.testing.assert_close(turned, torch.rot90(image, k=-1, dims=(-2, -1)), atol=1e-5, rtol=0)
    marker = torch.zeros(1, 3, SIZE, SIZE)
    marker[..., 1, 8] = 1.0  # near the top edge
    turned = apply(marker, "rotation", 90.0)
    y, x = divmod(int(turned[0, 0].argmax()), SIZE)
    assert (y, x) == (8, 14)  # clockwise on screen: the top goes to the right


def test_scale_enlarges_the_centre_like_bilinear_upsampling_of_a_crop(image):
    zoomed = apply(image, "scale", 2.0)
    crop = image[..., SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4]
    oracle = F.interpolate(crop, scale_factor=2, mode="bilinear", align_corners=False)
    # interpolate clamps at the crop's edge where grid_sample still reads the pixels outside it.
    torch.testing.assert_close(zoomed[..., 1:-1, 1:-1], oracle[..., 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_unknown_transform_and_fill_are_rejected(image):
    with pytest.raises(ValueError, match="unknown transform 'shear'"):
        affine_theta("shear", 1.0, SIZE)
    with pytest.raises(ValueError, match="fill must be one of"):
        transform_images(image, affine_theta("scale", 1.0, SIZE).unsqueeze(0), fill="black")


def test_sweep_amounts_span_the_configured_ranges_in_pixels_ratios_and_degrees():
    settings = {"translation": {"range": [-0.25, 0.25], "steps": 5}, "scale": {"range": [1, 1.8], "steps": 3}, "rotation": {"range": [0, 360], "steps": 4}}
    amounts = sweep_amounts(settings, 64)
    np.testing.assert_allclose(amounts["translation"], [-16, -8, 0, 8, 16])
    np.testing.assert_allclose(amounts["scale"], [1.0, 1.4, 1.8])
    np.testing.assert_allclose(amounts["rotation"], [0, 120, 240, 360])


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return build_model("lenet", 3, 32).eval()


def test_batched_sweep_equals_a_per_image_loop(lenet):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1])
    amounts = {"translation": np.array([-4.0, 0.0, 5.0]), "scale": np.array([1.0, 1.5]), "rotation": np.array([0.0, 45.0])}
    table = invariance_sweep(lenet, "lenet", images, labels, amounts, batch_size=4, log=lambda m: None)
    layers = list(get_spec("lenet").layers)
    assert len(table) == 3 * 7 * len(layers)
    with torch.no_grad():
        for row in table.sample(25, random_state=0).itertuples():
            original = images[row.image : row.image + 1]
            moved = transform_images(original, affine_theta(row.transform, row.amount, 32).unsqueeze(0))
            feats_a, _ = forward_features(lenet, "lenet", original, row.layer)
            feats_b, _ = forward_features(lenet, "lenet", moved, row.layer)
            probs = lenet(moved).softmax(1)[0]
            assert row.distance == pytest.approx(float((feats_a[row.layer] - feats_b[row.layer]).norm()), rel=1e-4, abs=1e-4)
            assert row.p_true == pytest.approx(float(probs[labels[row.image]]), abs=1e-5)
            assert row.predicted == int(probs.argmax())
    identity = identity_rows(table)
    assert len(identity) == 3 * 3 * len(layers) and identity["distance"].max() < 1e-3


def test_run_invariance_writes_one_row_per_image_amount_and_layer(tmp_path, tiny_dataset):
    torch.manual_seed(0)
    model = build_model("lenet", 3, 64)
    save_checkpoint(tmp_path / "final.pt", "lenet", model, epoch=0, num_classes=3, input_size=64, arch_cfg={})
    settings = {
        "images": 2, "split": "val", "fill": "reflect", "seed": 0, "device": "cpu", "analysis": {"batch_size": 8, "threads": 1},
        "translation": {"range": [-0.25, 0.25], "steps": 3}, "scale": {"range": [1.0, 1.8], "steps": 2}, "rotation": {"range": [0, 360], "steps": 4},
    }
    messages = []
    run_invariance(tmp_path / "final.pt", tiny_dataset, settings, tmp_path / "inv.parquet", tmp_path / "inv.png", messages.append)
    table = pd.read_parquet(tmp_path / "inv.parquet")
    assert list(table.columns) == COLUMNS
    assert len(table) == 2 * (3 + 2 + 4) * len(get_spec("lenet").layers)
    assert table["image_id"].nunique() == 2 and set(table["transform"]) == set(TRANSFORMS)
    assert dict(table.groupby("transform")["amount_unit"].first()) == {"translation": "px", "scale": "ratio", "rotation": "deg"}
    assert sorted(table.loc[table["transform"] == "translation", "amount"].unique()) == [-16.0, 0.0, 16.0]
    assert table["p_true"].between(0, 1).all()
    assert (tmp_path / "inv.png").stat().st_size > 10_000
    assert "done in" in messages[-1]


def test_decreasing_sweep_range_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"invariance\.scale\.range': \[1\.8, 1\.0\] must be increasing"):
        validate_config({"invariance": {"scale": {"range": [1.8, 1.0]}}})


@pytest.mark.workflow
def test_smoke_run_writes_invariance_for_every_model(smoke_run):
    import yaml

    models = yaml.safe_load((smoke_run / "config.yaml").read_text())["models"]
    for model in models:
        out = smoke_run / "results" / "invariance" / model
        table = pd.read_parquet(out / "invariance.parquet")
        assert list(table.columns) == COLUMNS
        assert set(table["model"]) == {model} and set(table["transform"]) == set(TRANSFORMS)
        assert set(table["layer"]) == set(get_spec(model).layers)
        # Smoke sweeps include the identity (translation 0, scale 1, rotation 0 and 360).
        identity = identity_rows(table)
        assert len(identity) == table["image_id"].nunique() * 4 * len(get_spec(model).layers) and identity["distance"].max() < 1e-2 * table["distance"].max()
        assert table["p_true"].between(0, 1).all()
        assert (out / "invariance.png").stat().st_size > 10_000
