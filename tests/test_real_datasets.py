"""Real-dataset export: tiny trees in each dataset's real on-disk layout (no download)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from convviz.data.common import DatasetError, ImageDataset, load_image, read_dataset
from convviz.data.real import VOC_CLASSES, export_real_dataset

SIZE = 16


def write_image(path: Path, mode: str = "RGB", size=(24, 20), seed: int = 0) -> Path:
    """A small image of random pixels; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    img.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def export(name, root, out, **kw):
    kw.setdefault("download", False)
    kw.setdefault("image_size", SIZE)
    kw.setdefault("seed", 0)
    logs = []
    meta = export_real_dataset(name, out, root=root, log=logs.append, **kw)
    manifest, parts, disk_meta = read_dataset(out)
    assert meta == disk_meta
    assert logs and "wrote" in logs[-1]  # the summary line
    return manifest, parts, meta


def check_common(manifest: pd.DataFrame, meta: dict, root: Path) -> None:
    """Properties every exported dataset has."""
    assert list(manifest.columns[:5]) == ["image_id", "split", "label", "class_name", "path"]
    assert manifest["image_id"].is_unique
    assert set(manifest["split"]) <= {"train", "val"}
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in manifest["path"])
    assert all(meta["classes"][lab] == name for lab, name in zip(manifest["label"], manifest["class_name"]))
    assert meta["image_size"] == SIZE and meta["root"] == str(root)
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
    assert all(0 < m < 1 for m in meta["mean"]) and all(0 < s < 1 for s in meta["std"])
    assert meta["counts"] == manifest["split"].value_counts().to_dict()
    for path in manifest["path"]:
        assert load_image(path, SIZE).shape == (SIZE, SIZE, 3)


# --------------------------------------------------------------------------- tree builders


def imagefolder_tree(root: Path, classes=("cat", "dog", "fish"), n=4, splits=None) -> Path:
    for s, split in enumerate(splits or [None]):
        for c, cls in enumerate(classes):
            for k in range(n):
                folder = root / split / cls if split else root / cls
                write_image(folder / f"img{k}.jpg", seed=100 * s + 10 * c + k)
    return root


IMAGENET = {"n01440764": ("tench", "Tinca tinca"), "n02012849": ("crane",), "n03126707": ("crane",)}


def imagenet_tree(root: Path) -> Path:
    import torch

    wnids = sorted(IMAGENET)
    val_wnids = [w for w in wnids for _ in range(2)]
    root.mkdir(parents=True)
    torch.save((IMAGENET, val_wnids), root / "meta.bin")  # what parse_devkit_archive writes
    for c, wnid in enumerate(wnids):
        for k in range(3):
            write_image(root / "train" / wnid / f"{wnid}_{k}.JPEG", seed=10 * c + k)
    # val: the layout torchvision leaves after sorting ILSVRC2012_img_val.tar into wnid folders;
    # the last class has no val folder, so val's own indices would differ from train's.
    for i, wnid in enumerate(val_wnids[:4]):
        write_image(root / "val" / wnid / f"ILSVRC2012_val_{i + 1:08d}.JPEG", seed=50 + i)
    return root


IMAGENETTE_WNIDS = ["n01440764", "n02102040", "n03888257"]


def imagenette_tree(root: Path, folder="imagenette2-160") -> Path:
    for s, split in enumerate(("train", "val")):
        for c, wnid in enumerate(IMAGENETTE_WNIDS):
            for k in range(3 if split == "train" else 2):
                write_image(root / folder / split / wnid / f"{wnid}_{k}.JPEG", seed=100 * s + 10 * c + k)
    (root / folder / "noisy_imagenette.csv").write_text("path,noisy_labels_0\n")
    return root


def caltech101_tree(root: Path) -> Path:
    base = root / "caltech101" / "101_ObjectCategories"
    for c, cls in enumerate(("BACKGROUND_Google", "Faces", "accordion", "airplanes")):
        for k in range(4):
            write_image(base / cls / f"image_{k + 1:04d}.jpg", seed=10 * c + k)
    return root


def caltech256_tree(root: Path) -> Path:
    base = root / "caltech256" / "256_ObjectCategories"
    for c, cls in enumerate(("001.ak47", "002.american-flag", "003.backpack", "257.clutter")):
        for k in range(4):
            write_image(base / cls / f"{cls[:3]}_{k + 1:04d}.jpg", seed=10 * c + k)
    return root


def voc_xml(objects, width=40, height=30) -> str:
    """A VOC annotation; objects are (class, (xmin, ymin, xmax, ymax) 1-based inclusive, difficult)."""
    objs = "".join(
        f"<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(diff)}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for cls, b, diff in objects
    )
    return (
        f"<annotation><folder>VOC2012</folder><filename>x.jpg</filename><size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>"
    )


VOC_IMAGES = {
    # id: (split, objects)
    "2008_000001": ("train", [("dog", (1, 1, 10, 10), False), ("person", (5, 5, 40, 30), False)]),
    "2008_000002": ("train", [("cat", (3, 4, 20, 20), False), ("car", (1, 1, 40, 30), True)]),
    "2008_000003": ("train", [("bird", (2, 2, 8, 8), True), ("bird", (2, 2, 30, 25), True)]),
    "2008_000004": ("val", [("tvmonitor", (10.5, 3, 30, 20), False)]),
    "2008_000005": ("val", [("aeroplane", (1, 1, 40, 30), False), ("aeroplane", (1, 1, 5, 5), False)]),
}


def voc_tree(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    for i, (image_id, (split, objects)) in enumerate(VOC_IMAGES.items()):
        write_image(voc / "JPEGImages" / f"{image_id}.jpg", size=(40, 30), seed=i)
        (voc / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
    for split in ("train", "val"):
        ids = [i for i, (s, _) in VOC_IMAGES.items() if s == split]
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


# --------------------------------------------------------------------------- exports


def test_imagefolder_flat_tree_is_split_stratified_by_val_fraction(tmp_path):
    root = imagefolder_tree(tmp_path / "data")
    manifest, parts, meta = export("imagefolder", root, tmp_path / "out", val_fraction=0.25)
    check_common(manifest, meta, root)
    assert meta["classes"] == ["cat", "dog", "fish"] and meta["multilabel"] is False
    assert manifest.groupby(["split", "class_name"]).size().to_dict() == {
        **{("train", c): 3 for c in meta["classes"]},
        **{("val", c): 1 for c in meta["classes"]},
    }
    assert "cat__img0" in set(manifest["image_id"])
    assert parts.empty


def test_imagefolder_train_and_val_folders_become_the_splits(tmp_path):
    root = imagefolder_tree(tmp_path / "data", n=2, splits=["train", "val"])
    manifest, _, meta = export("imagefolder", root, tmp_path / "out")
    check_common(manifest, meta, root)
    assert meta["counts"] == {"train": 6, "val": 6}
    assert set(manifest.loc[manifest["split"] == "val", "image_id"]) == {
        f"val__{c}__img{k}" for c in ("cat", "dog", "fish") for k in range(2)
    }


def test_imagefolder_val_missing_a_class_keeps_train_label_indices(tmp_path):
    root = imagefolder_tree(tmp_path / "data", n=2, splits=["train"])
    write_image(root / "val" / "fish" / "a.jpg")
    manifest, _, meta = export("imagefolder", root, tmp_path / "out")
    val = manifest[manifest["split"] == "val"]
    assert val["class_name"].tolist() == ["fish"] and val["label"].tolist() == [meta["classes"].index("fish")]


def test_grayscale_and_rgba_images_in_imagefolder_load_as_three_channels(tmp_path):
    root = imagefolder_tree(tmp_path / "data", classes=("a", "b"), n=2)
    write_image(root / "a" / "gray.png", mode="L")
    write_image(root / "b" / "alpha.png", mode="RGBA")
    manifest, _, meta = export("imagefolder", root, tmp_path / "out")
    check_common(manifest, meta, root)  # loads every image at SIZE as (S, S, 3)
    for image_id in ("a__gray", "b__alpha"):
        path = manifest.set_index("image_id").at[image_id, "path"]
        assert load_image(path).shape[2] == 3


def test_imagenet_tree_uses_meta_bin_names_and_train_class_indices(tmp_path):
    root = imagenet_tree(tmp_path / "imagenet")
    manifest, _, meta = export("imagenet", root, tmp_path / "out")
    check_common(manifest, meta, root)
    # First synonym of each wnid; the duplicate 'crane' gets its wnid appended.
    assert meta["classes"] == ["tench", "crane (n02012849)", "crane (n03126707)"]
    assert meta["wnids"] == sorted(IMAGENET)
    assert meta["counts"] == {"train": 9, "val": 4}
    val = manifest[manifest["split"] == "val"].set_index("image_id")
    assert val.at["val__n02012849__ILSVRC2012_val_00000003", "label"] == 1
    assert "train__n01440764__n01440764_0" in set(manifest["image_id"])


def test_imagenette_tree_gets_human_readable_class_names(tmp_path):
    root = imagenette_tree(tmp_path / "imagenette")
    manifest, _, meta = export("imagenette", root, tmp_path / "out")
    check_common(manifest, meta, root)
    assert meta["classes"] == ["tench", "English springer", "parachute"]
    assert meta["variant"] == "160px" and meta["counts"] == {"train": 9, "val": 6}
    assert "train__n01440764__n01440764_0" in set(manifest["image_id"])


def test_caltech101_excludes_background_google_and_splits_each_class(tmp_path):
    root = caltech101_tree(tmp_path / "c101")
    manifest, _, meta = export("caltech101", root, tmp_path / "out", val_fraction=0.5)
    check_common(manifest, meta, root)
    assert meta["classes"] == ["Faces", "accordion", "airplanes"]
    assert not manifest["path"].str.contains("BACKGROUND_Google").any()
    assert (manifest.groupby(["class_name", "split"]).size() == 2).all()
    assert "accordion__image_0001" in set(manifest["image_id"])


def test_caltech256_drops_the_clutter_class_and_number_prefixes(tmp_path):
    root = caltech256_tree(tmp_path / "c256")
    manifest, _, meta = export("caltech256", root, tmp_path / "out")
    check_common(manifest, meta, root)
    assert meta["classes"] == ["ak47", "american-flag", "backpack"]
    assert not manifest["path"].str.contains("257.clutter").any()
    assert len(manifest) == 12


def test_voc2012_is_multilabel_with_largest_object_label_and_object_parts(tmp_path):
    root = voc_tree(tmp_path / "voc")
    manifest, parts, meta = export("voc2012", root, tmp_path / "out")
    check_common(manifest, meta, root)
    assert meta["multilabel"] is True and meta["classes"] == VOC_CLASSES
    rows = manifest.set_index("image_id")
    assert rows.loc["2008_000001", "split"] == "train" and rows.loc["2008_000004", "split"] == "val"
    cls = VOC_CLASSES.index
    # person is the larger object; both are listed.
    assert rows.loc["2008_000001", "class_name"] == "person"
    assert list(rows.loc["2008_000001", "labels"]) == [cls("dog"), cls("person")]
    # The difficult (larger) car is ignored for labels and parts.
    assert rows.loc["2008_000002", "class_name"] == "cat"
    assert list(rows.loc["2008_000002", "labels"]) == [cls("cat")]
    # Every object difficult: all of them are used.
    assert list(rows.loc["2008_000003", "labels"]) == [cls("bird")]
    # Boxes: 0-based, x1/y1 exclusive; "object" is the largest, then object_2, ...
    boxes = parts.set_index(["image_id", "part"])[["x0", "y0", "x1", "y1"]]
    assert boxes.loc[("2008_000001", "object")].tolist() == [4, 4, 40, 30]
    assert boxes.loc[("2008_000001", "object_2")].tolist() == [0, 0, 10, 10]
    assert ("2008_000002", "object_2") not in boxes.index
    assert boxes.loc[("2008_000004", "object")].tolist() == [9, 2, 30, 20]  # decimal xmin 10.5
    assert set(parts.loc[parts["image_id"] == "2008_000005", "part"]) == {"object", "object_2"}


def test_exported_dataset_feeds_image_dataset(tmp_path):
    root = voc_tree(tmp_path / "voc")
    export("voc2012", root, tmp_path / "out")
    ds = ImageDataset(tmp_path / "out", "val", SIZE)
    image, label = ds[0]
    assert tuple(image.shape) == (3, SIZE, SIZE) and 0 <= label < 20


def test_max_per_class_caps_each_class_in_each_split(tmp_path):
    root = caltech101_tree(tmp_path / "c101")
    manifest, _, meta = export("caltech101", root, tmp_path / "out", val_fraction=0.25, max_per_class=2)
    assert manifest.groupby(["split", "class_name"]).size().to_dict() == {
        **{("train", c): 2 for c in meta["classes"]},
        **{("val", c): 1 for c in meta["classes"]},
    }


def test_same_seed_gives_identical_manifest_and_another_seed_another_split(tmp_path):
    root = caltech256_tree(tmp_path / "c256")
    a, _, _ = export("caltech256", root, tmp_path / "a", seed=1)
    b, _, _ = export("caltech256", root, tmp_path / "b", seed=1)
    pd.testing.assert_frame_equal(a, b)
    val_sets = set()
    for s in range(6):
        manifest = export("caltech256", root, tmp_path / f"s{s}", seed=s)[0]
        val_sets.add(frozenset(manifest.loc[manifest["split"] == "val", "image_id"]))
    assert len(val_sets) > 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", ["imagefolder", "imagenet", "imagenette", "caltech101", "caltech256", "voc2012"])
def test_missing_root_names_the_root_and_is_not_created(tmp_path, name):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="does not exist") as err:
        export(name, root, tmp_path / "out")
    assert str(root) in str(err.value) and "data.root" in str(err.value)
    assert not root.exists()


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("caltech101", "caltech101/101_ObjectCategories"),
        ("caltech256", "caltech256/256_ObjectCategories"),
        ("voc2012", "VOCdevkit/VOC2012"),
        ("imagenette", "imagenette2-160"),
        ("imagenet", "meta.bin"),
    ],
)
def test_missing_layout_names_the_expected_path(tmp_path, name, missing):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DatasetError) as err:
        export(name, root, tmp_path / "out")
    assert str(root / missing) in str(err.value) and "expected layout" in str(err.value)
    assert list(root.iterdir()) == []  # torchvision's Caltech classes would create root/caltech*


def test_voc_missing_split_file_is_named(tmp_path):
    root = voc_tree(tmp_path / "voc")
    split_file = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "val.txt"
    split_file.unlink()
    with pytest.raises(DatasetError, match=str(split_file)):
        export("voc2012", root, tmp_path / "out")


def test_imagenet_missing_train_folder_and_archive_is_named(tmp_path):
    root = imagenet_tree(tmp_path / "imagenet")
    shutil.rmtree(root / "train")
    with pytest.raises(DatasetError, match="ILSVRC2012_img_train.tar") as err:
        export("imagenet", root, tmp_path / "out")
    assert str(root / "train") in str(err.value)


def test_imagenet_download_is_refused_with_manual_instructions(tmp_path):
    with pytest.raises(DatasetError, match="ILSVRC2012_devkit_t12.tar.gz") as err:
        export("imagenet", tmp_path / "imagenet", tmp_path / "out", download=True)
    assert str(tmp_path / "imagenet") in str(err.value)


@pytest.mark.parametrize(
    ("name", "build", "empty"),
    [
        ("imagefolder", imagefolder_tree, "bird"),
        ("imagefolder", lambda r: imagefolder_tree(r, n=2, splits=["train", "val"]), "val/bird"),
        ("caltech101", caltech101_tree, "caltech101/101_ObjectCategories/bird"),
        ("caltech256", caltech256_tree, "caltech256/256_ObjectCategories/004.bird"),
        ("imagenet", imagenet_tree, "train/n09999999"),
        ("imagenette", imagenette_tree, "imagenette2-160/val/n03000684"),
    ],
)
def test_empty_class_folder_is_named(tmp_path, name, build, empty):
    root = build(tmp_path / "root")
    (root / empty).mkdir(parents=True)
    (root / empty / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError) as err:
        export(name, root, tmp_path / "out")
    assert str(root / empty) in str(err.value) and "no " in str(err.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_image_is_named_whichever_split_it_is_in(tmp_path, split):
    root = imagefolder_tree(tmp_path / "data", n=2, splits=["train", "val"])
    bad = root / split / "dog" / "img1.jpg"
    truncate(bad)
    with pytest.raises(DatasetError, match="unreadable") as err:
        export("imagefolder", root, tmp_path / "out")
    assert str(bad) in str(err.value)
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_truncated_voc_image_is_named(tmp_path):
    root = voc_tree(tmp_path / "voc")
    bad = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000005.jpg"
    truncate(bad)
    with pytest.raises(DatasetError, match=str(bad)):
        export("voc2012", root, tmp_path / "out")


def test_missing_voc_image_is_named(tmp_path):
    root = voc_tree(tmp_path / "voc")
    gone = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000002.jpg"
    gone.unlink()
    with pytest.raises(DatasetError, match=str(gone)):
        export("voc2012", root, tmp_path / "out")


def test_unknown_dataset_name_lists_the_choices(tmp_path):
    with pytest.raises(DatasetError, match="caltech101"):
        export("mnist", tmp_path, tmp_path / "out")


def test_dataset_json_records_the_settings(tmp_path):
    root = caltech101_tree(tmp_path / "c101")
    export("caltech101", root, tmp_path / "out", seed=3, max_per_class=3)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["name"] == "caltech101" and meta["seed"] == 3 and meta["max_per_class"] == 3
    assert meta["source"] == "torchvision.datasets.Caltech101" and meta["multilabel"] is False


# --------------------------------------------------------------------------- download path
# torchvision's own download code runs; only its network fetch is replaced by a function that
# writes the tree the archive would have produced.


def fake_caltech101_archive(download_root):
    caltech101_tree(Path(download_root).parent)
    (Path(download_root) / "caltech-101").mkdir()  # torchvision unpacks .gz files from here, then removes it
    (Path(download_root) / "caltech-101.zip").write_bytes(b"")


DOWNLOADS = {
    "caltech101": ("torchvision.datasets.caltech", fake_caltech101_archive),
    "caltech256": ("torchvision.datasets.caltech", lambda d: caltech256_tree(Path(d).parent)),
    "imagenette": ("torchvision.datasets.imagenette", lambda d: imagenette_tree(Path(d))),
    "voc2012": ("torchvision.datasets.voc", lambda d: voc_tree(Path(d))),
}


@pytest.mark.parametrize("name", sorted(DOWNLOADS))
def test_download_true_fetches_through_torchvision_into_a_new_root_once(tmp_path, monkeypatch, name):
    module, build = DOWNLOADS[name]
    calls = []

    def fake_download(url, download_root, *args, **kwargs):
        calls.append(url)
        build(download_root)

    monkeypatch.setattr(f"{module}.download_and_extract_archive", fake_download)
    root = tmp_path / "new" / "root"
    manifest, _, meta = export(name, root, tmp_path / "out", download=True)
    check_common(manifest, meta, root)
    assert len(calls) == 1 and calls[0].startswith("https://")
    # Already downloaded: a second export does not fetch again.
    export(name, root, tmp_path / "out2", download=True)
    assert len(calls) == 1


def test_failed_download_is_a_dataset_error_naming_the_root(tmp_path, monkeypatch):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("network unreachable")

    monkeypatch.setattr("torchvision.datasets.caltech.download_and_extract_archive", offline)
    root = tmp_path / "c256"
    with pytest.raises(DatasetError, match="download") as err:
        export("caltech256", root, tmp_path / "out", download=True)
    assert str(root) in str(err.value) and "network unreachable" in str(err.value)


def test_imagenet_devkit_without_scipy_asks_for_scipy(tmp_path):
    import importlib.util

    if importlib.util.find_spec("scipy") is not None:
        pytest.skip("scipy is installed: torchvision would parse the (fake) devkit")
    root = imagenet_tree(tmp_path / "imagenet")
    (root / "meta.bin").unlink()
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="scipy") as err:
        export("imagenet", root, tmp_path / "out")
    assert str(root / "meta.bin") in str(err.value)


def test_parts_table_naming_an_unknown_image_is_refused_naming_the_file(tmp_path, tiny_dataset):
    """A parts.parquet row for an image the manifest does not hold stops loading, naming the file."""
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    parts = pd.read_parquet(data / "parts.parquet")
    stray = parts.iloc[[0]].assign(image_id="no_such_image")
    pd.concat([parts, stray]).to_parquet(data / "parts.parquet")
    with pytest.raises(DatasetError, match=r"parts\.parquet.*not in the manifest.*no_such_image"):
        read_dataset(data)
