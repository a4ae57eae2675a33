"""Real datasets (ImageFolder, ImageNet, Imagenette, Caltech-101/256, PASCAL VOC 2012) -> common form.

Each source is read (and, where torchvision can, downloaded) through torchvision's own dataset
class, so the on-disk layout and the download code are torchvision's. The images are NOT copied:
``manifest.parquet`` holds absolute paths to the original files. See ``convviz.data.common`` for
the common form; the conventions specific to this module are:

- ``image_id``: the image's path relative to the dataset's image folder, without extension,
  ``/`` replaced by ``__`` (e.g. ``accordion__image_0001``, ``train__n01440764__n01440764_10026``,
  ``2008_000008`` for VOC). Stable across runs; an extension is kept only where two files would
  otherwise collide (``img.jpg`` and ``img.png`` in one folder).
- splits are ``train`` and ``val``: the dataset's own split where it has one (ImageNet,
  Imagenette, VOC, an ImageFolder with ``train/`` and ``val/``), else a seeded split stratified
  by class (``val_fraction`` of each class, at least one image on each side when a class has two).
- ``max_per_class`` caps the images of each class in each split (seeded choice; VOC: by ``label``).
- VOC is multi-label: ``labels`` lists the classes of the image's non-difficult objects (all
  objects when every one is difficult) and ``label`` is the class of the largest of them. Those
  objects' boxes become parts named ``object`` (the largest, i.e. the ``label`` object),
  ``object_2``, ``object_3``, ... in order of decreasing area, so the name ``object`` means
  "the labelled object's box" for VOC as for the synthetic data.
- ``dataset.json`` adds ``root``, ``source`` (the torchvision class), ``variant`` (Imagenette's
  size), ``seed``, ``val_fraction`` and ``max_per_class`` to the common keys.

Every problem a user can fix raises ``DatasetError`` naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from convviz.data.common import DatasetError, channel_stats, load_image, write_dataset_tables

DATASETS = ("imagefolder", "imagenet", "imagenette", "caltech101", "caltech256", "voc2012")
# Datasets torchvision cannot download (the user's own folder; ImageNet's licence).
NOT_DOWNLOADABLE = ("imagefolder", "imagenet")

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip

STATS_SAMPLE = 500  # train images loaded for the channel mean/std
VERIFY_ALL_LIMIT = 20000  # datasets up to this size have every image checked
VERIFY_SAMPLE = 500  # otherwise this many per split are checked
VERIFY_THREADS = 8  # PIL releases the GIL while decoding, so threads do speed the check up

LAYOUTS = {
    "imagefolder": "ROOT/<class>/<image> (split by val_fraction) or ROOT/train/<class>/<image> "
    "[+ ROOT/val/<class>/<image>]",
    "imagenet": "ROOT/meta.bin (or ROOT/ILSVRC2012_devkit_t12.tar.gz), ROOT/train/<wnid>/<image>.JPEG "
    "(or ROOT/ILSVRC2012_img_train.tar), ROOT/val/<wnid>/<image>.JPEG (or ROOT/ILSVRC2012_img_val.tar)",
    "imagenette": "ROOT/imagenette2[-320|-160]/{train,val}/<wnid>/<image>.JPEG",
    "caltech101": "ROOT/caltech101/101_ObjectCategories/<class>/image_0001.jpg",
    "caltech256": "ROOT/caltech256/256_ObjectCategories/001.ak47/001_0001.jpg",
    "voc2012": "ROOT/VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, Annotations/<id>.xml, "
    "ImageSets/Main/train.txt, ImageSets/Main/val.txt}",
}


@dataclass
class Listing:
    """What a source yields before the common steps (capping, checking, statistics, writing)."""

    records: list[dict]  # image_id, split, label, class_name, path [, labels]
    classes: list[str]
    parts: list[dict] = field(default_factory=list)  # image_id, part, x0, y0, x1, y1
    multilabel: bool = False
    meta: dict = field(default_factory=dict)  # extra dataset.json keys


def export_real_dataset(
    name: str,
    out_dir,
    *,
    root,
    download: bool,
    image_size: int,
    seed: int,
    val_fraction: float = 0.2,
    max_per_class: int | None = None,
    variant: str | None = None,
    log=print,
) -> dict:
    """List a real dataset under ``root`` and write its common form to ``out_dir``.

    ``name`` is one of DATASETS. ``download`` lets torchvision fetch the dataset into ``root``
    (not possible for imagefolder and imagenet). ``variant`` is Imagenette's image size
    ("full", "320px", "160px"); None picks one already under root, else the smallest whose shorter
    side is at least ``image_size``. Returns the metadata written to dataset.json.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown real dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}; fix data.val_fraction")
    if max_per_class is not None and max_per_class < 1:
        raise DatasetError(f"max_per_class must be a positive integer or null, got {max_per_class}")
    root = Path(os.path.abspath(os.path.expanduser(str(root))))
    _check_root(name, root, download)
    log(f"[{name}] reading {root} (layout {LAYOUTS[name]})")
    lister = _LISTERS[name]
    kwargs = {"variant": variant, "image_size": image_size} if name == "imagenette" else {}
    listing = lister(root, download=download, seed=seed, val_fraction=val_fraction, log=log, **kwargs)

    manifest = _manifest(listing)
    if manifest.empty:
        raise DatasetError(f"[{name}] no images found under {root}; expected layout {LAYOUTS[name]}")
    if max_per_class is not None:
        manifest = _cap_per_class(manifest, max_per_class, seed)
        log(f"[{name}] capped to {max_per_class} images per class per split: {len(manifest)} images")
    parts = _parts_table(listing.parts, manifest)

    _verify_images(manifest, seed, log, name)
    mean, std = _train_stats(manifest, image_size, seed, log, name)

    counts = {k: int(v) for k, v in manifest["split"].value_counts().sort_index().items()}
    meta = {
        "name": name,
        "classes": listing.classes,
        "image_size": int(image_size),
        "mean": mean,
        "std": std,
        "multilabel": listing.multilabel,
        "root": str(root),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "max_per_class": max_per_class,
        "counts": counts,
        **listing.meta,
    }
    write_dataset_tables(out_dir, manifest, parts, meta)
    split_text = ", ".join(f"{k} {v}" for k, v in counts.items())
    log(
        f"[{name}] wrote {out_dir}: {len(manifest)} images ({split_text}), {len(listing.classes)} classes, "
        f"{0 if parts is None else len(parts)} part boxes, mean {mean}, std {std}"
    )
    return meta


# --------------------------------------------------------------------------- common checks


def _check_root(name: str, root: Path, download: bool) -> None:
    """A missing root is an error unless torchvision is about to download into it."""
    if download and name in NOT_DOWNLOADABLE:
        raise DatasetError(_no_download_message(name, root))
    if root.is_dir():
        return
    if root.exists():
        raise DatasetError(f"dataset root {root} is not a directory; set data.root in your config")
    if download:
        root.mkdir(parents=True, exist_ok=True)
        return
    fix = "set data.root in your config" + ("" if name in NOT_DOWNLOADABLE else " or download: true")
    raise DatasetError(f"dataset root {root} does not exist; {fix} (expected layout {LAYOUTS[name]})")


def _no_download_message(name: str, root: Path) -> str:
    if name == "imagenet":
        return (
            "ImageNet cannot be downloaded automatically (its licence requires a login): download "
            "ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz from "
            f"https://image-net.org/ into {root}, then set download: false"
        )
    return f"imagefolder is your own folder and cannot be downloaded; set download: false and data.root to it ({root})"


def _require_dir(path: Path, name: str, root: Path, fix: str) -> None:
    """Raise a DatasetError naming ``path`` when that folder of the layout is missing."""
    if not path.is_dir():
        raise DatasetError(
            f"{path} not found under root {root}; expected layout {LAYOUTS[name]}; {fix}"
        )


@contextlib.contextmanager
def _torchvision_errors(name: str, root: Path, download: bool, expected: Path | str):
    """Translate torchvision's exceptions (RuntimeError 'Dataset not found...', a missing split
    file, a failed download, ...) into DatasetError naming the expected path and the fix."""
    try:
        yield
    except DatasetError:
        raise
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        if download:
            fix = (
                "the download or extraction failed: check the network and free disk space, or fetch "
                f"the archive manually into {root} and rerun with download: false"
            )
        else:
            fix = "fix data.root in your config, or set download: true to let torchvision fetch it"
            if name in NOT_DOWNLOADABLE:
                fix = "fix data.root in your config or complete the folder"
        raise DatasetError(
            f"[{name}] cannot read {expected}: {err.__class__.__name__}: {err}. "
            f"Expected layout {LAYOUTS[name]}; {fix}"
        ) from err


def _is_image(filename: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return filename.lower().endswith(IMG_EXTENSIONS)


def _raise_if_empty_class_dirs(split_dir: Path, classes, extensions=None) -> None:
    """Name the first class folder of ``split_dir`` holding no image (torchvision only says
    'Found no valid file for the classes ...' without the folder, or skips it silently)."""
    ok = (lambda f: f.lower().endswith(extensions)) if extensions else _is_image
    empty = []
    for cls in classes:
        folder = split_dir / cls
        if not any(ok(f) for _, _, files in os.walk(folder, followlinks=True) for f in files):
            empty.append(folder)
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        wanted = ", ".join(extensions) if extensions else "image"
        raise DatasetError(
            f"class folder {empty[0]} contains no {wanted} files{more}; add images to it or delete the folder"
        )


# --------------------------------------------------------------------------- helpers for listers


def _image_id(path: str, image_root: Path) -> str:
    rel = os.path.relpath(path, image_root)
    return os.path.splitext(rel)[0].replace(os.sep, "__").replace("/", "__")


def _records(samples, classes: list[str], split: str, image_root: Path) -> list[dict]:
    """(path, label) pairs -> manifest records."""
    return [
        {
            "image_id": _image_id(path, image_root),
            "split": split,
            "label": int(label),
            "class_name": classes[label],
            "path": os.path.abspath(path),
        }
        for path, label in samples
    ]


def _stratified_split(samples, val_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split of (path, label) pairs taking ``val_fraction`` of every class for val.

    Each class is shuffled by its own generator (seed, label), so adding a class leaves the
    split of the others unchanged; a class of two or more images keeps one image on each side.
    """
    by_class: dict[int, list[str]] = {}
    for path, label in samples:
        by_class.setdefault(int(label), []).append(path)
    train, val = [], []
    for label, paths in sorted(by_class.items()):
        paths = sorted(paths)
        order = np.random.default_rng([seed, label]).permutation(len(paths))
        n_val = int(round(len(paths) * val_fraction))
        if val_fraction > 0 and len(paths) >= 2:
            n_val = min(max(n_val, 1), len(paths) - 1)
        val += [(paths[i], label) for i in sorted(order[:n_val])]
        train += [(paths[i], label) for i in sorted(order[n_val:])]
    return train, val


def _unique_names(names: list[str], keys: list[str]) -> list[str]:
    """Append the key to names that occur more than once (ImageNet has two 'crane's)."""
    seen = pd.Series(names).duplicated(keep=False).tolist()
    return [f"{n} ({k})" if dup else n for n, k, dup in zip(names, keys, seen)]


# --------------------------------------------------------------------------- sources


def _list_imagefolder(root: Path, *, download, seed, val_fraction, log) -> Listing:
    """The user's folder: root/train/<class>/ [+ root/val/<class>/] or root/<class>/ split here."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import find_classes, make_dataset

    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        ds = _image_folder(ImageFolder, root)
        train, val = _stratified_split(ds.samples, val_fraction, seed)
        log(f"[imagefolder] no train/ folder: split {len(ds.samples)} images by val_fraction {val_fraction}")
        records = _records(train, ds.classes, "train", root) + _records(val, ds.classes, "val", root)
        return Listing(records, list(ds.classes), meta={"source": "torchvision.datasets.ImageFolder"})

    ds = _image_folder(ImageFolder, train_dir)
    if val_dir.is_dir():
        # Labels must mean the same in both splits: val uses train's class indices, so a val
        # folder missing a class is fine but a class unknown to train is not.
        val_classes, _ = find_classes(val_dir)
        unknown = sorted(set(val_classes) - set(ds.classes))
        if unknown:
            raise DatasetError(
                f"class folder {val_dir / unknown[0]} has no counterpart in {train_dir}; "
                "rename or remove it so val classes match train classes"
            )
        _raise_if_empty_class_dirs(val_dir, val_classes)
        val = make_dataset(str(val_dir), {c: ds.class_to_idx[c] for c in val_classes}, is_valid_file=_is_image)
        train = ds.samples
    else:
        log(f"[imagefolder] no {val_dir}: split train/ by val_fraction {val_fraction}")
        train, val = _stratified_split(ds.samples, val_fraction, seed)
    records = _records(train, ds.classes, "train", root) + _records(val, ds.classes, "val", root)
    return Listing(records, list(ds.classes), meta={"source": "torchvision.datasets.ImageFolder"})


def _image_folder(cls, folder: Path):
    """ImageFolder(folder) with its errors (no class folder, an empty class folder) translated."""
    from torchvision.datasets.folder import find_classes

    try:
        return cls(str(folder))
    except FileNotFoundError as err:
        try:
            classes, _ = find_classes(folder)
        except FileNotFoundError:
            raise DatasetError(
                f"no class folders in {folder}; expected layout {LAYOUTS['imagefolder']}"
            ) from err
        _raise_if_empty_class_dirs(folder, classes)
        raise DatasetError(f"cannot read image folder {folder}: {err}") from err


def _list_imagenet(root: Path, *, download, seed, val_fraction, log) -> Listing:
    """ImageNet 2012 via torchvision.datasets.ImageNet (meta.bin + wnid folders per split)."""
    from torchvision.datasets import ImageNet
    from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE

    meta_file, devkit = root / META_FILE, root / ARCHIVE_META["devkit"][0]
    if not meta_file.is_file():
        if not devkit.is_file():
            raise DatasetError(
                f"{meta_file} not found and no {devkit} to build it from; download the devkit archive "
                f"from https://image-net.org/ into {root} (expected layout {LAYOUTS['imagenet']})"
            )
        try:  # torchvision parses the devkit's meta.mat with scipy, imported only then
            import scipy.io  # noqa: F401
        except ImportError as err:
            raise DatasetError(
                f"building {meta_file} from {devkit} needs scipy: install it (pip install scipy) and rerun"
            ) from err
    splits = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            tar = root / ARCHIVE_META[split][0]
            if not tar.is_file():
                raise DatasetError(
                    f"{folder} not found and no {tar} to extract it from; place the archive in {root} "
                    f"(expected layout {LAYOUTS['imagenet']})"
                )
            log(f"[imagenet] extracting {tar} into {folder} (torchvision; this takes a long time)")
        log(f"[imagenet] listing {folder}")
        splits[split] = _imagenet_split(ImageNet, root, split)

    train = splits["train"]
    wnid_to_idx = {w: i for i, w in enumerate(train.wnids)}
    names = _unique_names([names[0] for names in train.classes], list(train.wnids))
    val = splits["val"]
    unknown = sorted(set(val.wnids) - set(wnid_to_idx))
    if unknown:
        raise DatasetError(
            f"class folder {root / 'val' / unknown[0]} has no counterpart in {root / 'train'}; "
            "val classes must match train classes"
        )
    # Class indices follow train's wnid order; val's own indices would differ if it lacked a class.
    val_samples = [(p, wnid_to_idx[val.wnids[i]]) for p, i in val.samples]
    records = _records(train.samples, names, "train", root) + _records(val_samples, names, "val", root)
    return Listing(records, names, meta={"source": "torchvision.datasets.ImageNet", "wnids": list(train.wnids)})


def _imagenet_split(cls, root: Path, split: str):
    """ImageNet(root, split) with an empty, flat or unknown class folder named in the error."""
    from torchvision.datasets.folder import find_classes
    from torchvision.datasets.imagenet import ARCHIVE_META

    try:
        with _torchvision_errors("imagenet", root, False, root / split):
            return cls(str(root), split=split)
    except DatasetError as err:
        cause = err.__cause__
        if isinstance(cause, FileNotFoundError) and (root / split).is_dir():
            try:
                classes, _ = find_classes(root / split)
            except FileNotFoundError:
                raise DatasetError(
                    f"no wnid class folders in {root / split}; if you extracted {ARCHIVE_META[split][0]} "
                    f"yourself, move {root / split} away and put the archive in {root} so torchvision sorts it"
                ) from cause
            _raise_if_empty_class_dirs(root / split, classes)
        if isinstance(cause, KeyError):
            raise DatasetError(
                f"class folder {root / split / str(cause.args[0])} is not an ImageNet wnid listed in "
                f"{root / 'meta.bin'}; remove it"
            ) from cause
        raise


IMAGENETTE_VARIANTS = {"160px": 160, "320px": 320, "full": None}  # shorter side of the images


def _imagenette_variant(root: Path, variant: str | None, image_size: int) -> str:
    """An explicit variant; else one already under root; else the smallest big enough."""
    from torchvision.datasets import Imagenette

    if variant is not None:
        if variant not in IMAGENETTE_VARIANTS:
            raise DatasetError(f"imagenette variant must be one of {list(IMAGENETTE_VARIANTS)}, got {variant!r}")
        return variant
    big_enough = [v for v, side in IMAGENETTE_VARIANTS.items() if side is None or side >= image_size]
    for v in big_enough + [v for v in IMAGENETTE_VARIANTS if v not in big_enough]:
        if (root / Path(Imagenette._ARCHIVES[v][0]).stem).is_dir():
            return v
    return big_enough[0]


def _list_imagenette(root: Path, *, download, seed, val_fraction, log, variant, image_size) -> Listing:
    """Imagenette via torchvision.datasets.Imagenette: root/imagenette2[-320|-160]/{train,val}/<wnid>/."""
    from torchvision.datasets import Imagenette

    variant = _imagenette_variant(root, variant, image_size)
    size_root = root / Path(Imagenette._ARCHIVES[variant][0]).stem
    if not download:
        _require_dir(size_root, "imagenette", root, "set download: true or fix data.root")
    log(f"[imagenette] variant {variant} at {size_root}")
    splits = {}
    for split in ("train", "val"):
        if not download or split == "val":  # torchvision downloads once; then the folders exist
            _require_dir(size_root / split, "imagenette", root, "re-extract the archive or set download: true")
        try:
            with _torchvision_errors("imagenette", root, download, size_root / split):
                splits[split] = Imagenette(str(root), split=split, size=variant, download=download)
        except DatasetError as err:
            if isinstance(err.__cause__, FileNotFoundError) and (size_root / split).is_dir():
                from torchvision.datasets.folder import find_classes

                _raise_if_empty_class_dirs(size_root / split, find_classes(size_root / split)[0], (".jpeg",))
            raise
    train = splits["train"]
    names = [Imagenette._WNID_TO_CLASS[w][0] for w in train.wnids]
    wnid_to_idx = {w: i for i, w in enumerate(train.wnids)}
    unknown = sorted(set(splits["val"].wnids) - set(wnid_to_idx))
    if unknown:
        raise DatasetError(
            f"class folder {size_root / 'val' / unknown[0]} has no counterpart in {size_root / 'train'}; "
            "val classes must match train classes (re-extract the archive)"
        )
    records = []
    for split, ds in splits.items():
        # Imagenette keeps its (path, index) list in the private `_samples`; indices are per split.
        samples = [(p, wnid_to_idx[ds.wnids[i]]) for p, i in ds._samples]
        records += _records(samples, names, split, size_root)
    meta = {"source": "torchvision.datasets.Imagenette", "variant": variant, "wnids": list(train.wnids)}
    return Listing(records, names, meta=meta)


def _list_caltech(name: str, root: Path, download: bool, seed: int, val_fraction: float, log) -> Listing:
    """Caltech-101/256: torchvision gives the categories; the files are listed here because
    torchvision rebuilds names from a count (image_0001..n), wrong when a number is missing."""
    from torchvision.datasets import Caltech101, Caltech256

    cls, sub, folder = {
        "caltech101": (Caltech101, "caltech101", "101_ObjectCategories"),
        "caltech256": (Caltech256, "caltech256", "256_ObjectCategories"),
    }[name]
    image_root = root / sub / folder
    if not download:
        # Checked before torchvision, whose constructor creates root/<sub> even when it fails.
        _require_dir(image_root, name, root, "set download: true or fix data.root")
    with _torchvision_errors(name, root, download, image_root):
        try:
            categories = list(cls(str(root), download=download).categories)
        except ValueError as err:
            # Caltech101 does categories.remove("BACKGROUND_Google"): a tree without that folder fails.
            if "BACKGROUND_Google" in str(err) or "not in list" in str(err):
                categories = sorted(e.name for e in os.scandir(image_root) if e.is_dir())
            else:
                raise
    if name == "caltech256":
        # The paper uses the 256 object classes: drop 257.clutter.
        categories = [c for c in categories if not c.startswith("257.")]
        names = [c.split(".", 1)[1] if "." in c else c for c in categories]
    else:
        categories = [c for c in categories if c != "BACKGROUND_Google"]
        names = categories
    samples = []
    for label, cat in enumerate(categories):
        files = sorted(f for f in os.listdir(image_root / cat) if _is_image(f) and (image_root / cat / f).is_file())
        if not files:
            raise DatasetError(
                f"class folder {image_root / cat} contains no image files; re-extract the dataset or delete the folder"
            )
        samples += [(str(image_root / cat / f), label) for f in files]
    train, val = _stratified_split(samples, val_fraction, seed)
    log(f"[{name}] {len(samples)} images in {len(categories)} classes, split by val_fraction {val_fraction}")
    records = _records(train, names, "train", image_root) + _records(val, names, "val", image_root)
    return Listing(records, names, meta={"source": f"torchvision.datasets.{cls.__name__}"})


def _list_caltech101(root: Path, *, download, seed, val_fraction, log) -> Listing:
    return _list_caltech("caltech101", root, download, seed, val_fraction, log)


def _list_caltech256(root: Path, *, download, seed, val_fraction, log) -> Listing:
    return _list_caltech("caltech256", root, download, seed, val_fraction, log)


def _list_voc2012(root: Path, *, download, seed, val_fraction, log) -> Listing:
    """PASCAL VOC 2012 detection train/val: multi-label records and object boxes as parts."""
    from torchvision.datasets import VOCDetection

    voc_root = root / "VOCdevkit" / "VOC2012"
    # VOCDetection(download=True) fetches and unpacks the 2 GB archive on every call, even when
    # the tree is already there (no existence check, unlike the other classes): download only
    # when the tree is absent, and only with the first split.
    fetch = download and not voc_root.is_dir()
    records, parts = [], []
    for i, split in enumerate(("train", "val")):
        fetch_now = fetch and i == 0
        split_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
        if not fetch_now:
            _require_dir(voc_root, "voc2012", root, "set download: true or fix data.root")
            for needed in (voc_root / "JPEGImages", voc_root / "Annotations", split_file.parent):
                _require_dir(needed, "voc2012", root, "re-extract VOCtrainval_11-May-2012.tar")
            if not split_file.is_file():
                raise DatasetError(f"{split_file} not found; expected layout {LAYOUTS['voc2012']}")
        with _torchvision_errors("voc2012", root, fetch_now, voc_root):
            ds = VOCDetection(str(root), year="2012", image_set=split, download=fetch_now)
        log(f"[voc2012] {split}: {len(ds.images)} images")
        for image, xml in zip(ds.images, ds.annotations):
            record, boxes = _voc_image(image, Path(xml), split, voc_root / "JPEGImages")
            records.append(record)
            parts += boxes
    return Listing(
        records, list(VOC_CLASSES), parts=parts, multilabel=True, meta={"source": "torchvision.datasets.VOCDetection"}
    )


def _voc_image(image: str, xml: Path, split: str, image_root: Path) -> tuple[dict, list[dict]]:
    """One VOC image: its record (labels, label of the largest object) and object-box parts."""
    objects = _voc_objects(xml)
    if not objects:
        raise DatasetError(f"annotation {xml} lists no object; re-extract the dataset")
    used = [o for o in objects if not o["difficult"]] or objects
    used.sort(key=lambda o: -(o["x1"] - o["x0"]) * (o["y1"] - o["y0"]))  # stable: ties keep file order
    image_id = _image_id(image, image_root)
    label = used[0]["label"]
    record = {
        "image_id": image_id,
        "split": split,
        "label": label,
        "class_name": VOC_CLASSES[label],
        "path": os.path.abspath(image),
        "labels": sorted({o["label"] for o in used}),
    }
    boxes = [
        {"image_id": image_id, "part": "object" if k == 0 else f"object_{k + 1}",
         **{c: o[c] for c in ("x0", "y0", "x1", "y1")}}
        for k, o in enumerate(used)
    ]  # fmt: skip
    return record, boxes


def _voc_objects(xml: Path) -> list[dict]:
    """Objects of a VOC annotation as class index, difficult flag and a 0-based box, x1/y1 exclusive.

    VOC boxes are 1-based and inclusive; a few coordinates are written as decimals.
    """
    from xml.etree.ElementTree import ParseError, parse

    from torchvision.datasets import VOCDetection

    if not xml.is_file():
        raise DatasetError(f"annotation file {xml} not found; re-extract VOCtrainval_11-May-2012.tar")
    try:
        ann = VOCDetection.parse_voc_xml(parse(xml).getroot())["annotation"]
    except (ParseError, KeyError) as err:
        raise DatasetError(f"cannot parse annotation {xml}: {err}; re-extract the dataset") from err
    size = ann.get("size", {}) if isinstance(ann.get("size"), dict) else {}
    width, height = int(float(size.get("width", 0) or 0)), int(float(size.get("height", 0) or 0))
    objects = []
    for obj in ann.get("object", []):
        cls = obj.get("name", "").strip()
        if cls not in VOC_CLASSES:
            raise DatasetError(f"annotation {xml} names unknown class {cls!r}; expected one of the 20 VOC classes")
        try:
            box = {k: round(float(obj["bndbox"][k])) for k in ("xmin", "ymin", "xmax", "ymax")}
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"annotation {xml} has a malformed bndbox for {cls!r}: {err}") from err
        x0, y0, x1, y1 = box["xmin"] - 1, box["ymin"] - 1, box["xmax"], box["ymax"]
        x0, y0 = max(x0, 0), max(y0, 0)
        if width > 0 and height > 0:
            x1, y1 = min(x1, width), min(y1, height)
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)  # never an empty box
        difficult = str(obj.get("difficult", "0")).strip() == "1"
        objects.append({"label": VOC_CLASSES.index(cls), "difficult": difficult, "x0": x0, "y0": y0, "x1": x1,
                        "y1": y1})  # fmt: skip
    return objects


_LISTERS = {
    "imagefolder": _list_imagefolder,
    "imagenet": _list_imagenet,
    "imagenette": _list_imagenette,
    "caltech101": _list_caltech101,
    "caltech256": _list_caltech256,
    "voc2012": _list_voc2012,
}


# --------------------------------------------------------------------------- common steps


def _manifest(listing: Listing) -> pd.DataFrame:
    """Records -> manifest, sorted (split, image_id); colliding ids keep their extension."""
    columns = ["image_id", "split", "label", "class_name", "path"] + (["labels"] if listing.multilabel else [])
    manifest = pd.DataFrame(listing.records, columns=columns)
    dup = manifest["image_id"].duplicated(keep=False)
    if dup.any():
        ext = manifest.loc[dup, "path"].map(lambda p: os.path.splitext(p)[1].lower())
        manifest.loc[dup, "image_id"] = manifest.loc[dup, "image_id"] + ext
    order = {"train": 0, "val": 1}
    manifest = manifest.sort_values(["split", "image_id"], key=lambda s: s.map(order) if s.name == "split" else s)
    return manifest.reset_index(drop=True)


def _cap_per_class(manifest: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """Keep at most ``cap`` images of each class in each split (seeded, per-group generator)."""
    keep = []
    for (split, label), group in manifest.groupby(["split", "label"], sort=True):
        idx = group.index.to_numpy()
        if len(idx) > cap:
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, int(label)])
            idx = np.sort(rng.choice(idx, size=cap, replace=False))
        keep.append(idx)
    return manifest.loc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def _parts_table(parts: list[dict], manifest: pd.DataFrame) -> pd.DataFrame | None:
    """Parts of the images kept in the manifest (None when the dataset has no boxes)."""
    if not parts:
        return None
    table = pd.DataFrame(parts, columns=["image_id", "part", "x0", "y0", "x1", "y1"])
    table = table[table["image_id"].isin(set(manifest["image_id"]))]
    return table.astype({c: "int64" for c in ("x0", "y0", "x1", "y1")}).reset_index(drop=True)


def _check_image(path: str) -> str | None:
    """None if the file decodes, else the reason. JPEGs decode at 1/8 scale (PIL draft mode):
    a fraction of the cost of a full decode, yet the whole stream is read, so truncation shows."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable
        return f"{err.__class__.__name__}: {err}"
    return None


def _verify_images(manifest: pd.DataFrame, seed: int, log, name: str) -> None:
    """Check every image (<= VERIFY_ALL_LIMIT) or a seeded sample per split; name all bad files."""
    if len(manifest) <= VERIFY_ALL_LIMIT:
        paths = manifest["path"].tolist()
    else:
        rng = np.random.default_rng([seed, 2])
        paths = []
        for _, group in manifest.groupby("split", sort=True):
            take = min(VERIFY_SAMPLE, len(group))
            paths += group["path"].to_numpy()[np.sort(rng.choice(len(group), take, replace=False))].tolist()
    log(f"[{name}] checking {len(paths)} of {len(manifest)} image files")
    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        bad = [(p, why) for p, why in zip(paths, pool.map(_check_image, paths)) if why]
    if bad:
        listed = "; ".join(f"{p} ({why})" for p, why in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DatasetError(
            f"[{name}] {len(bad)} unreadable image file(s): {listed}{more}. "
            "They are truncated or not images: delete or replace them (or re-download), then rerun."
        )


def _train_stats(manifest: pd.DataFrame, image_size: int, seed: int, log, name: str):
    """Channel mean/std over a seeded sample of <= STATS_SAMPLE train images at ``image_size``."""
    train = manifest[manifest["split"] == "train"]
    if train.empty:
        raise DatasetError(f"[{name}] the train split is empty; check the dataset root and max_per_class")
    rng = np.random.default_rng([seed, 3])
    take = np.sort(rng.choice(len(train), min(STATS_SAMPLE, len(train)), replace=False))
    paths = train["path"].to_numpy()[take]
    log(f"[{name}] channel statistics over {len(paths)} train images at {image_size}px")
    return channel_stats([load_image(p, image_size) for p in paths])
