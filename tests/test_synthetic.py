"""Tests of the synthetic dataset generator (convviz.data.synthetic): tiny sizes, a few seconds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from convviz.data.common import MANIFEST_COLUMNS, PARTS_COLUMNS, ImageDataset, channel_stats, read_dataset
from convviz.data.synthetic import (
    OBJECT_PART,
    SOURCE_CLASSES,
    SOURCE_DESIGNS,
    TARGET_CLASSES,
    TARGET_DESIGNS,
    generate_synthetic,
    render_sample,
)

SMALL = dict(image_size=32, classes=3, train_per_class=3, val_per_class=2)


def quiet(*_):
    pass


def generate(out_dir, **overrides):
    args = {**SMALL, "seed": 0, "log": quiet, **overrides}
    return generate_synthetic(out_dir, **args)


def pixels(data_dir) -> dict:
    """image_id -> uint8 array of every image of a dataset directory."""
    manifest, _, _ = read_dataset(data_dir)
    return {row.image_id: np.asarray(Image.open(row.path)) for row in manifest.itertuples()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    meta = generate(out)
    manifest, parts, _ = read_dataset(out)
    return out, meta, manifest, parts


def colour_mask(image: np.ndarray, colour, tol: float = 12.0) -> np.ndarray:
    return np.linalg.norm(image.astype(float) - np.asarray(colour, float), axis=-1) < tol


def erode(mask: np.ndarray) -> np.ndarray:
    """Keep pixels whose 4 neighbours are set too: drops the blended 1-pixel edges of shapes."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def inside(mask: np.ndarray, box) -> np.ndarray:
    """The part of mask that lies inside box (x0, y0, x1, y1; x1/y1 exclusive)."""
    x0, y0, x1, y1 = box
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_gives_identical_tables_and_images(tmp_path):
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    for name in ("manifest.parquet", "parts.parquet", "dataset.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    a, b = pixels(tmp_path / "a"), pixels(tmp_path / "b")
    assert a.keys() == b.keys()
    for image_id in a:
        np.testing.assert_array_equal(a[image_id], b[image_id], err_msg=image_id)


def test_different_seed_gives_different_images(tmp_path):
    generate(tmp_path / "a", seed=0)
    generate(tmp_path / "b", seed=1)
    a, b = pixels(tmp_path / "a"), pixels(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(not np.array_equal(a[k], b[k]) for k in a)


def test_changing_a_count_keeps_the_other_images(tmp_path):
    generate(tmp_path / "a", train_per_class=3, classes=2)
    generate(tmp_path / "b", train_per_class=4, classes=3)
    a, b = pixels(tmp_path / "a"), pixels(tmp_path / "b")
    assert set(a) < set(b)
    for image_id in a:
        np.testing.assert_array_equal(a[image_id], b[image_id], err_msg=image_id)


def test_source_and_target_sets_with_same_seed_differ(tmp_path):
    generate(tmp_path / "s", classes=2)
    generate(tmp_path / "t", classes=2, target=True)
    s, t = pixels(tmp_path / "s"), pixels(tmp_path / "t")
    assert not set(s) & set(t), "image ids of source and target must not clash"
    assert all(k.startswith("t_") for k in t)


# --- classes ---------------------------------------------------------------------------------


def test_source_and_target_class_names_are_disjoint_and_numerous():
    assert len(SOURCE_CLASSES) >= 10
    assert len(TARGET_CLASSES) >= 5
    assert not set(SOURCE_CLASSES) & set(TARGET_CLASSES)
    assert len(set(SOURCE_CLASSES)) == len(SOURCE_CLASSES)
    assert len(set(TARGET_CLASSES)) == len(TARGET_CLASSES)


def test_first_source_class_is_face_with_eyes_and_nose():
    face = SOURCE_DESIGNS[0]
    assert face.name == "face"
    assert {"left_eye", "right_eye", "nose"} <= set(face.parts)


def test_every_class_declares_two_to_four_parts_it_draws():
    for design in SOURCE_DESIGNS + TARGET_DESIGNS:
        assert 2 <= len(design.parts) <= 4, design.name
        assert OBJECT_PART not in design.parts
        for seed in range(20):
            drawn = {s.part for s in design.draw(np.random.default_rng(seed)) if s.part}
            assert drawn == set(design.parts), design.name


def test_every_design_fits_inside_the_unit_disc():
    # This is what keeps any rotation of an object with relative size <= 1 inside the image.
    for design in SOURCE_DESIGNS + TARGET_DESIGNS:
        for seed in range(50):
            for shape in design.draw(np.random.default_rng(seed)):
                assert np.hypot(*shape.points.T).max() <= 1.0, design.name


def test_classes_argument_selects_the_first_designs_in_label_order(small_set):
    _, meta, manifest, _ = small_set
    assert meta["classes"] == list(SOURCE_CLASSES[:3])
    for label, name in enumerate(meta["classes"]):
        assert set(manifest.loc[manifest["label"] == label, "class_name"]) == {name}


def test_default_target_set_has_five_classes(tmp_path):
    meta = generate(tmp_path, classes=None, target=True, image_size=16, train_per_class=1, val_per_class=1)
    assert meta["name"] == "synthetic_target"
    assert meta["classes"] == list(TARGET_CLASSES[:5])


# --- tables and files ------------------------------------------------------------------------


def test_manifest_has_columns_relative_paths_and_splits(small_set):
    out, _, _, _ = small_set
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert set(MANIFEST_COLUMNS) <= set(manifest.columns)
    assert manifest["image_id"].is_unique
    assert manifest["split"].value_counts().to_dict() == {"train": 9, "val": 6}
    for row in manifest.itertuples():
        assert row.path == f"images/{row.split}/{row.class_name}/{row.image_id}.png"
        assert (out / row.path).is_file()


def test_images_are_rgb_of_the_requested_size(small_set):
    out, _, manifest, _ = small_set
    for path in manifest["path"]:
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (32, 32)


def test_meta_matches_dataset_json_and_train_channel_stats(small_set):
    out, meta, manifest, _ = small_set
    assert json.loads((out / "dataset.json").read_text()) == meta
    train = [np.asarray(Image.open(p)) for p in manifest.loc[manifest["split"] == "train", "path"]]
    assert (meta["mean"], meta["std"]) == channel_stats(train)
    assert meta["name"] == "synthetic" and meta["multilabel"] is False and meta["seed"] == 0
    assert meta["image_size"] == 32
    assert meta["parts"] == sorted(meta["parts"])
    assert {"object", "left_eye", "right_eye", "nose", "roof"} <= set(meta["parts"])


def test_every_image_has_an_object_box_and_its_class_parts(small_set):
    _, meta, manifest, parts = small_set
    assert list(parts.columns[: len(PARTS_COLUMNS)]) == PARTS_COLUMNS
    by_image = parts.groupby("image_id")["part"].apply(set).to_dict()
    for row in manifest.itertuples():
        assert by_image[row.image_id] == set(meta["class_parts"][row.class_name]), row.image_id
    face_ids = manifest.loc[manifest["class_name"] == "face", "image_id"]
    assert all({"left_eye", "right_eye", "nose"} <= by_image[i] for i in face_ids)


def test_part_boxes_are_non_empty_inside_image_and_overlap_object_box(small_set):
    _, _, _, parts = small_set
    assert (parts["x0"] >= 0).all() and (parts["y0"] >= 0).all()
    assert (parts["x1"] <= 32).all() and (parts["y1"] <= 32).all()
    assert ((parts["x1"] > parts["x0"]) & (parts["y1"] > parts["y0"])).all()
    objects = parts[parts["part"] == OBJECT_PART].set_index("image_id")
    for row in parts[parts["part"] != OBJECT_PART].itertuples():
        o = objects.loc[row.image_id]
        # Parts are drawn inside the object, so their boxes lie within the object box.
        assert o.x0 <= row.x0 and o.y0 <= row.y0 and row.x1 <= o.x1 and row.y1 <= o.y1, row


def test_rerun_replaces_images_and_keeps_other_files(tmp_path):
    generate(tmp_path, classes=3)
    keep = tmp_path / "notes.txt"
    keep.write_text("user file")
    generate(tmp_path, classes=2)
    pngs = list((tmp_path / "images").rglob("*.png"))
    assert len(pngs) == 2 * 5
    assert not (tmp_path / "images" / "train" / SOURCE_CLASSES[2]).exists()
    assert keep.read_text() == "user file"


# --- part boxes against the drawn pixels ----------------------------------------------------


def face_sample(seed: int, rotation_deg: float):
    rng = np.random.default_rng(seed)
    return render_sample(SOURCE_DESIGNS[0], rng, 64, (0.85, 0.95), rotation_deg, 0, plain=True)


def test_eye_boxes_cover_the_drawn_eyes_under_rotation():
    for seed in range(10):
        sample = face_sample(seed, 180.0)
        # Only the eyes have the "detail" colour in a face; eroding drops blended edge pixels.
        eyes = erode(colour_mask(sample.image, sample.colours["detail"]))
        left, right = sample.boxes["left_eye"], sample.boxes["right_eye"]
        assert inside(eyes, left).any() and inside(eyes, right).any(), seed
        assert not (eyes & ~(inside(eyes, left) | inside(eyes, right))).any(), seed
        # Boxes are tight: an eye box is not much bigger than an eye (< 1/10 of the image).
        for x0, y0, x1, y1 in (left, right):
            assert (x1 - x0) * (y1 - y0) < 64 * 64 / 10, seed


def test_nose_and_mouth_boxes_cover_the_accent_pixels():
    for seed in range(10):
        sample = face_sample(seed, 180.0)
        accent = erode(colour_mask(sample.image, sample.colours["accent"]))
        covered = inside(accent, sample.boxes["nose"]) | inside(accent, sample.boxes["mouth"])
        assert inside(accent, sample.boxes["nose"]).any(), seed
        assert not (accent & ~covered).any(), seed


def test_left_eye_is_on_the_viewers_left_of_an_upright_face():
    for seed in range(5):
        sample = face_sample(seed, 0.0)
        left, right = sample.boxes["left_eye"], sample.boxes["right_eye"]
        assert left[2] <= right[0], (seed, left, right)
        nose = sample.boxes["nose"]
        assert max(left[3], right[3]) <= nose[3], "eyes are above the bottom of the nose"


def test_object_box_contains_every_drawn_object_pixel():
    for design in SOURCE_DESIGNS + TARGET_DESIGNS:
        for seed in range(4):
            rng = np.random.default_rng(seed)
            sample = render_sample(design, rng, 48, (0.45, 0.95), 180.0, 0, plain=True)
            drawn = ~colour_mask(sample.image, sample.colours["background"], tol=1.0)
            box = sample.boxes[OBJECT_PART]
            assert drawn.any(), design.name
            assert not (drawn & ~inside(drawn, box)).any(), (design.name, seed, box)


def test_every_part_box_contains_its_colour():
    # Colour roles per part come from the designs; a box off its part would miss them.
    for design in SOURCE_DESIGNS + TARGET_DESIGNS:
        for seed in range(3):
            rng = np.random.default_rng(seed)
            shapes = design.draw(np.random.default_rng(seed))
            roles = {}
            for s in shapes:
                if s.part:
                    roles.setdefault(s.part, set()).add(s.role)
            sample = render_sample(design, rng, 64, (0.8, 0.95), 180.0, 0, plain=True)
            for part, part_roles in roles.items():
                box = sample.boxes[part]
                hit = any(inside(colour_mask(sample.image, sample.colours[r]), box).any() for r in part_roles)
                assert hit, (design.name, seed, part)


def test_clutter_images_have_texture_and_differ_from_plain_ones():
    rng = np.random.default_rng(3)
    sample = render_sample(SOURCE_DESIGNS[1], rng, 32, (0.45, 0.6), 180.0, 3)
    x0, y0, x1, y1 = sample.boxes[OBJECT_PART]
    background = np.ones((32, 32), bool)
    background[y0:y1, x0:x1] = False
    assert sample.image[background].std(axis=0).mean() > 5, "background should not be flat"


# --- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"classes": len(SOURCE_CLASSES) + 1}, "classes"),
        ({"classes": 1}, "classes"),
        ({"classes": len(TARGET_CLASSES) + 1, "target": True}, "classes"),
        ({"image_size": 15}, "image_size"),
        ({"train_per_class": 0}, "train_per_class"),
        ({"val_per_class": -1}, "val_per_class"),
        ({"scale_range": (0.9, 0.5)}, "scale_range"),
        ({"scale_range": (0.0, 0.5)}, "scale_range"),
        ({"scale_range": (0.5, 1.2)}, "scale_range"),
        ({"scale_range": 0.5}, "scale_range"),
        ({"rotation_deg": -1.0}, "rotation_deg"),
        ({"distractors": -1}, "distractors"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(tmp_path, overrides, name):
    with pytest.raises(ValueError, match=name):
        generate(tmp_path, **overrides)
    assert not (tmp_path / "images").exists(), "nothing is written for bad arguments"


def test_normalise_is_the_formula_bit_for_bit_and_leaves_its_input_alone(small_set):
    import torch

    out, meta, _, _ = small_set
    dataset = ImageDataset(out, "train", meta["image_size"])
    raw = dataset.raw_batch(range(len(dataset)))
    before = raw.clone()
    normalised = dataset.normalise(raw)
    assert normalised.dtype == torch.float32
    assert torch.equal(normalised, (raw.float() / 255.0 - dataset.mean) / dataset.std)
    assert torch.equal(raw, before)
    as_float = raw.float()  # a float input is copied too, never overwritten
    dataset.normalise(as_float)
    assert torch.equal(as_float, before.float())


@pytest.mark.parametrize("damage", ["dataset.json missing", "dataset.json broken", "manifest.parquet truncated", "parts.parquet truncated"])
def test_a_damaged_dataset_directory_is_named_with_a_fix(small_set, tmp_path, damage):
    """Each file of a dataset directory that is missing or damaged gets a DatasetError naming it
    and saying to rebuild the dataset, not a bare JSONDecodeError or ArrowInvalid."""
    import shutil

    from convviz.data.common import DatasetError, read_dataset

    copy = tmp_path / "ds"
    shutil.copytree(small_set[0], copy)
    name, how = damage.split(" ")
    target = copy / name
    if how == "missing":
        target.unlink()
    elif how == "broken":
        target.write_text('{"name": "synthetic",\n')
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(DatasetError, match=rf"{name}.*run the dataset rule again"):
        read_dataset(copy)
