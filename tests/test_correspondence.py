"""Correspondence study (Table 1, Fig. 8): Delta by hand on tiny vectors (sign-of-zero included),
the masks, the batched study against a per-image brute-force loop, errors, and the smoke run."""

import copy
import itertools
import random

import numpy as np
import pandas as pd
import pytest
import torch

from convviz.analysis import open_split
from convviz.config import ConfigError, validate_config
from convviz.correspondence import (
    COLUMNS,
    PAPER_TABLE1,
    RANDOM,
    Occlusion,
    correspondence_delta,
    correspondence_table,
    hamming_delta,
    occlude,
    occluder_side,
    part_pool,
    part_square,
    plan_occlusions,
    random_square,
    run_correspondence,
    sign_with_tolerance,
)
from convviz.data.common import DatasetError
from convviz.layer_features import forward_features
from convviz.models.checkpoint import save_checkpoint
from convviz.models.registry import build_model, get_spec

PARTS = ["left_eye", "right_eye", "nose"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ------------------------------------------------------------------------------ Delta by hand


def test_delta_by_hand_counts_sign_zero_as_its_own_value():
    eps = torch.tensor([[1.0, -1.0, 0.0, 2.0], [1.0, 1.0, 0.0, -3.0], [0.0, -1.0, 0.0, 5.0]])
    # signs: (+ - 0 +), (+ + 0 -), (0 - 0 +). Differing positions per pair, of 4:
    # (0,1): positions 1, 3 -> 0.5;  (0,2): position 0 (+ vs 0) -> 0.25;  (1,2): 0, 1, 3 -> 0.75.
    assert hamming_delta(sign_with_tolerance(eps)) == pytest.approx((0.5 + 0.25 + 0.75) / 3)
    # Had sign(0) counted as +, pair (0,2) would agree everywhere and Delta would be 1/3 lower:
    as_plus = torch.where(eps >= 0, 1, -1).to(torch.int8)
    assert hamming_delta(as_plus) == pytest.approx((0.5 + 0.0 + 0.5) / 3)


def test_delta_is_zero_for_identical_changes_and_one_for_opposite_changes():
    same = torch.tensor([[3.0, -2.0, 0.0]] * 4)
    assert hamming_delta(sign_with_tolerance(same)) == 0.0
    opposite = torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, -2.0]])
    assert hamming_delta(sign_with_tolerance(opposite)) == 1.0
    unchanged_vs_changed = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    assert hamming_delta(sign_with_tolerance(unchanged_vs_changed)) == 1.0


def test_delta_equals_a_brute_force_loop_over_ordered_pairs():
    signs = torch.from_numpy(np.random.default_rng(0).integers(-1, 2, size=(6, 50))).to(torch.int8)
    brute = np.mean([np.mean(signs[i].numpy() != signs[j].numpy()) for i, j in itertools.permutations(range(6), 2)])
    assert hamming_delta(signs) == pytest.approx(brute, abs=1e-12)


def test_delta_needs_two_images():
    with pytest.raises(ValueError, match="at least 2 images"):
        hamming_delta(torch.zeros(1, 3, dtype=torch.int8))


def test_differences_within_the_tolerance_have_sign_zero():
    eps = torch.tensor([[1e-7, -2e-7, 0.5, -0.5, 0.0]])
    assert sign_with_tolerance(eps, atol=1e-6).tolist() == [[0, 0, 1, -1, 0]]
    assert sign_with_tolerance(eps).tolist() == [[1, -1, 1, -1, 0]]


# ------------------------------------------------------------------------------ masks


def test_part_square_is_centred_on_the_part_and_clipped_to_the_image():
    assert part_square((10, 20, 16, 24), 8, 64) == (9, 18, 17, 26)
    assert part_square((0, 60, 4, 64), 8, 64) == (0, 58, 6, 64)


def test_occluder_side_is_the_longest_part_side_unless_configured():
    boxes = {"left_eye": (0, 0, 6, 4), "nose": (0, 0, 5, 9), "mouth": (0, 0, 20, 3)}
    assert occluder_side(boxes, ["left_eye", "nose"], None) == 9
    assert occluder_side(boxes, ["left_eye", "nose"], 5) == 5


def test_random_squares_stay_inside_the_object_box():
    rng = random.Random(0)
    for _ in range(200):
        x0, y0, x1, y1 = random_square(rng, 6, 64, within=(20, 10, 40, 30))
        assert (x1 - x0, y1 - y0) == (6, 6) and 20 <= x0 and x1 <= 40 and 10 <= y0 and y1 <= 30
    # An object smaller than the mask: anywhere in the image instead.
    x0, y0, x1, y1 = random_square(rng, 10, 64, within=(30, 30, 34, 34))
    assert 0 <= x0 and x1 <= 64 and (x1 - x0, y1 - y0) == (10, 10)


def test_occlude_sets_only_the_box_to_the_mean_colour():
    images = torch.randn(2, 3, 8, 8)
    out = occlude(images, [(1, 2, 4, 3), (0, 0, 0, 0)])
    assert out[0, :, 2:3, 1:4].abs().max() == 0
    mask = torch.ones_like(images, dtype=torch.bool)
    mask[0, :, 2:3, 1:4] = False
    assert torch.equal(out[mask], images[mask])


# ------------------------------------------------------------------------------ the study


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return build_model("lenet", 3, 64).eval()


@pytest.fixture(scope="module")
def faces(tiny_dataset):
    return open_split(tiny_dataset, None, 64)


def brute_force_delta(model, dataset, members, tolerance):
    """Delta per layer from one image at a time, numpy signs and a loop over ordered pairs."""
    originals = sorted({o.image for o in members})
    with torch.no_grad():
        reference = {i: forward_features(model, "lenet", dataset.normalise(dataset.raw_batch([i])))[0] for i in originals}
        result = {}
        for layer in reference[originals[0]]:
            atol = tolerance * max(float(reference[i][layer].abs().max()) for i in originals)
            signs = []
            for o in members:
                occluded = occlude(dataset.normalise(dataset.raw_batch([o.image])), [o.box])
                eps = (reference[o.image][layer] - forward_features(model, "lenet", occluded)[0][layer])[0].numpy()
                signs.append(np.where(np.abs(eps) <= atol, 0, np.sign(eps)))
            result[layer] = np.mean([np.mean(signs[i] != signs[j]) for i, j in itertools.permutations(range(len(signs)), 2)])
    return result


def test_batched_study_equals_a_per_image_brute_force_loop(lenet, faces):
    pool = part_pool(faces, "face", PARTS)
    image_sets = [pool[:4], pool[3:7]]
    plan = plan_occlusions(faces, image_sets, PARTS, random_draws=2, occluder_size=None, seed=0)
    assert len(plan) == 2 * 4 * (3 + 2)
    deltas = correspondence_delta(lenet, "lenet", faces, plan, batch_size=5, log=lambda m: None)
    assert len(deltas) == len(get_spec("lenet").layers) * 2 * (3 + 2)
    for (occluder, image_set, draw), group in deltas.groupby(["occluder", "image_set", "draw"]):
        members = [o for o in plan if (o.occluder, o.image_set, o.draw) == (occluder, image_set, draw)]
        expected = brute_force_delta(lenet, faces, members, 1e-5)
        got = dict(zip(group["layer"], group["delta"]))
        assert got == pytest.approx(expected, abs=2e-3), (occluder, image_set, draw)


def test_masks_that_change_nothing_give_delta_zero_despite_batch_noise(lenet, faces):
    # Empty boxes at distinct places: the "occluded" images equal the originals but run in other
    # batch sizes, whose float noise (~1e-7) the tolerance must keep from becoming signs.
    pool = part_pool(faces, "face", PARTS)[:5]
    plan = [Occlusion(i, (k, k, k, k), RANDOM, 0, k) for k in range(3) for i in pool]
    deltas = correspondence_delta(lenet, "lenet", faces, plan, batch_size=4, log=lambda m: None)
    assert (deltas["delta"] == 0).all()


def test_missing_class_or_parts_are_errors_naming_what_exists(faces):
    with pytest.raises(DatasetError, match=r"class_name 'dog' is not a class .*its classes are \['face'"):
        part_pool(faces, "dog", PARTS)
    with pytest.raises(DatasetError, match=r"parts \['ear'\] are not annotated on class 'face'.*its parts are \[.*'left_eye'"):
        part_pool(faces, "face", ["left_eye", "ear"])
    faces_without_parts = copy.copy(faces)
    faces_without_parts.parts = faces.parts.iloc[0:0]
    with pytest.raises(DatasetError, match="no part annotations"):
        part_pool(faces_without_parts, "face", PARTS)


def test_table_puts_the_paper_numbers_beside_the_top_conv_and_last_hidden_layers():
    deltas = pd.DataFrame(
        [(layer, occ, s, 0, 0.1 * s + i, 5) for i, layer in enumerate(["conv1", "conv2", "fc4"]) for occ in ["nose", RANDOM] for s in range(3)],
        columns=["layer", "occluder", "image_set", "draw", "delta", "images"],
    )
    table = correspondence_table(deltas, "lenet").set_index(["layer", "occluder"])
    assert table.loc[("conv2", "nose"), "delta_mean"] == pytest.approx(1.1)
    assert table.loc[("conv2", "nose"), "delta_std"] == pytest.approx(0.1)
    assert table.loc[("conv2", RANDOM), "paper_delta_mean"] == PAPER_TABLE1[RANDOM][5][0]
    assert table.loc[("fc4", "nose"), "paper_delta_std"] == PAPER_TABLE1["nose"][7][1]
    assert pd.isna(table.loc[("conv1", "nose"), "paper_delta_mean"])


def settings(**overrides):
    base = {
        "class_name": "face", "parts": PARTS, "images": 5, "image_sets": 2, "random_draws": 2, "split": "val",
        "occluder_size": None, "zero_tolerance": 1e-5, "seed": 0, "device": "cpu", "analysis": {"batch_size": 16, "threads": 1},
    }
    return base | overrides


def test_run_correspondence_with_fewer_images_than_asked_logs_a_note(tmp_path, tiny_dataset, lenet):
    save_checkpoint(tmp_path / "final.pt", "lenet", lenet, epoch=0, num_classes=3, input_size=64, arch_cfg={})
    names = {"deltas": "d.parquet", "table": "t.parquet", "table_figure": "t.png", "bars": "b.png", "examples": "e.png"}
    outputs = {k: tmp_path / v for k, v in names.items()}
    messages = []
    run_correspondence(tmp_path / "final.pt", tiny_dataset, settings(), outputs, messages.append)
    assert any("NOTE" in m and "only 4 'face' images" in m for m in messages)
    deltas = pd.read_parquet(outputs["deltas"])
    assert list(deltas.columns) == COLUMNS and (deltas["images"] == 4).all()
    assert set(deltas["occluder"]) == set(PARTS) | {RANDOM}
    assert len(deltas) == len(get_spec("lenet").layers) * 2 * (3 + 2)
    assert deltas["delta"].between(0, 1).all()
    for name in ("table_figure", "bars", "examples"):
        assert outputs[name].stat().st_size > 5_000


def test_run_correspondence_without_two_images_of_the_class_is_an_error(tmp_path, tiny_dataset, lenet):
    save_checkpoint(tmp_path / "final.pt", "lenet", lenet, epoch=0, num_classes=3, input_size=64, arch_cfg={})
    with pytest.raises(DatasetError, match="class_name 'dog' is not a class"):
        run_correspondence(tmp_path / "final.pt", tiny_dataset, settings(class_name="dog"), {}, lambda m: None)


def test_reserved_part_names_are_a_config_error():
    with pytest.raises(ConfigError, match=r"correspondence\.parts': \['random'\] cannot be masked"):
        validate_config({"correspondence": {"parts": ["nose", "random"]}})


@pytest.mark.workflow
def test_smoke_run_writes_correspondence_for_every_model(smoke_run):
    import yaml

    models = yaml.safe_load((smoke_run / "config.yaml").read_text())["models"]
    for model in models:
        out = smoke_run / "results" / "correspondence" / model
        deltas = pd.read_parquet(out / "correspondence.parquet")
        assert list(deltas.columns) == COLUMNS and set(deltas["model"]) == {model}
        assert set(deltas["layer"]) == set(get_spec(model).layers)
        assert set(deltas["occluder"]) == {"left_eye", "right_eye", "nose", RANDOM}
        assert deltas["delta"].between(0, 1).all() and deltas["delta"].gt(0).any()
        table = pd.read_parquet(out / "table1.parquet")
        spec = get_spec(model)
        paper_rows = table[table["paper_layer"].notna()]
        assert set(paper_rows["layer"]) == {spec.top_conv, spec.penultimate}
        assert paper_rows["paper_delta_mean"].notna().all()
        for name in ("table1", "delta_by_layer", "occluders"):
            assert (out / f"{name}.png").stat().st_size > 5_000
