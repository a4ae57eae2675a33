"""Feature generalisation to other datasets (paper Sec. 5.2: Tables 4-7, Fig. 9).

Protocol, as the paper: every layer of the trained network is frozen and a new linear classifier
is trained on top of it.

- Features (rule transfer_features): one forward pass over every image of the target dataset
  stores the pooled output of every analysis layer (`convviz.layer_features`: conv maps
  average-pooled to pool_size x pool_size, fc outputs as they are). Every probe, N and split
  below reads this cache; nothing is recomputed per N.
- Classification targets (synthetic_target, caltech101, caltech256): the dataset's own
  train/val division is ignored and, as the paper, N training images per class are drawn at
  random and the rest (up to ``test_per_class``) are the test set, for each N in ``shots`` and
  each of ``splits`` random splits. Split s permutes each class c with its own generator
  (seed, s, c) and takes the first N as training images, so the training sets of one split are
  nested across N. A class with fewer than N + 1 images is left out of that N (logged and
  counted in the ``classes_used`` metric). Reported: mean per-class accuracy on the test images.
  * ``softmax`` on the penultimate layer (spec.penultimate: fc7, resnet's pool), every N
    (Tables 4-5, Fig. 9).
  * ``scratch``: the same architecture trained from random init on the same N images per class
    and the same splits (the paper's "non-pretrained" rows), for ``scratch.splits`` of them.
  * Layer-wise (Table 7), at the largest N: ``softmax`` and a linear ``svm`` on every analysis
    layer (the penultimate layer's softmax row is the one above).
- Multi-label targets (voc2012): independent sigmoids on the penultimate layer, trained on the
  train split, average precision per class and its mean (mAP) on the val split (Table 6).

transfer.parquet (tidy): model, target, probe, layer, n_per_class (<NA>: all images, VOC),
split, metric, value. Metrics: mean_class_accuracy, classes_used, train_images, test_images;
VOC: ap/<class> per class and map.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from convviz import paper
from convviz.analysis import load_for_analysis, open_split, resolve_device, write_npz
from convviz.layer_features import extract_features
from convviz.models.registry import get_spec
from convviz.probes import average_precision, fit_probe, mean_class_accuracy

TRANSFER_COLUMNS = ["model", "target", "probe", "layer", "n_per_class", "split", "metric", "value"]
WHOLE_NETWORK = "all"  # the `layer` of the from-scratch rows: every layer is trained

# The paper's numbers (convviz.paper: percent, mean and std over splits), keyed the way our
# tables are: probe "softmax" for pretrained features, "scratch" for the net trained from scratch.
PAPER_ACCURACY = {  # (target, probe, n_per_class) -> (mean, std): Tables 4 and 5
    (target, "softmax" if kind == "pretrained" else kind, shots): value
    for target, (_, table) in paper.TRANSFER_TABLES.items()
    for kind, by_shots in table.items()
    for shots, value in by_shots.items()
}
_PAPER_LAYER = {1: "conv1", 2: "conv2", 3: "conv3", 4: "conv4", 5: "conv5", 7: "fc7"}
PAPER_LAYERS = {  # (target, probe, layer) -> (mean, std): Table 7, Caltech-101 @30, Caltech-256 @60
    (target, probe, _PAPER_LAYER[layer]): value
    for target, table in paper.TABLE7.items()
    for probe in ("softmax", "svm")
    for layer, value in table[probe].items()
}
PAPER_LAYER_SHOTS = {target: table["shots"] for target, table in paper.TABLE7.items()}
PAPER_VOC_MAP = paper.TABLE6_MEAN_AP  # Table 6


# ------------------------------------------------------------------------- feature cache


@dataclass
class FeatureCache:
    """Pooled features of every image of a target: {layer: float32 [N, D]} in network order."""

    model: str
    layers: dict[str, np.ndarray]
    labels: np.ndarray  # [N] int64
    splits: np.ndarray  # [N] str: the dataset's own split
    image_ids: np.ndarray  # [N] str
    classes: list[str]
    multilabel: np.ndarray | None  # [N, C] uint8 for multi-label datasets
    penultimate: str
    pool_size: int


def write_feature_cache(path, model_name: str, features: Mapping[str, np.ndarray], dataset, pool_size: int) -> None:
    """Features plus what the probes need from the manifest, in one .npz (atomic)."""
    manifest = dataset.manifest
    arrays = {f"layer__{layer}": np.asarray(x, dtype=np.float32) for layer, x in features.items()}
    arrays.update(
        model=np.array(model_name),
        layer_order=np.array(list(features)),
        labels=manifest["label"].to_numpy(np.int64),
        splits=manifest["split"].to_numpy(str),
        image_ids=manifest["image_id"].to_numpy(str),
        classes=np.array(dataset.meta["classes"]),
        pool_size=np.array(pool_size),
    )
    if dataset.meta.get("multilabel"):
        multi = np.zeros((len(manifest), len(dataset.meta["classes"])), dtype=np.uint8)
        for i, present in enumerate(manifest["labels"]):
            multi[i, list(present)] = 1
        arrays["multilabel"] = multi
    write_npz(arrays, path)


def load_feature_cache(path) -> FeatureCache:
    with np.load(path) as data:  # no pickles: every array is numeric or fixed-width text
        model = str(data["model"])
        return FeatureCache(
            model=model,
            layers={str(layer): data[f"layer__{layer}"] for layer in data["layer_order"]},
            labels=data["labels"],
            splits=data["splits"],
            image_ids=data["image_ids"],
            classes=[str(c) for c in data["classes"]],
            multilabel=data["multilabel"] if "multilabel" in data.files else None,
            penultimate=get_spec(model).penultimate,
            pool_size=int(data["pool_size"]),
        )


def extract_target_features(checkpoint, target_dir, out_path, settings: dict, log: Callable[[str], None] = print) -> FeatureCache:
    """Rule transfer_features: the frozen model's pooled features of every target image."""
    device = resolve_device(settings["device"])
    model, meta = load_for_analysis(checkpoint, device)
    dataset = open_split(target_dir, None, int(meta["input_size"]))
    log(f"{meta['model']}: features of {len(dataset)} images of {target_dir} ({len(dataset.meta['classes'])} classes) on {device}")
    features = extract_features(
        model, meta["model"], dataset, pool_size=settings["pool_size"],
        batch_size=settings["analysis"]["batch_size"], device=device, log=log,
    )
    write_feature_cache(out_path, meta["model"], features, dataset, settings["pool_size"])
    return load_feature_cache(out_path)


# ------------------------------------------------------------------------- splits


@dataclass
class FewShotSplit:
    train: np.ndarray  # indices into the dataset
    test: np.ndarray
    classes: list[int]  # classes with enough images, in label order
    left_out: list[int]  # classes with fewer than N + 1 images


def few_shot_split(labels, n_per_class: int, seed: int, split: int, test_per_class: int | None = None) -> FewShotSplit:
    """N random training images per class, the rest (up to test_per_class) for testing.

    Class c of split s is permuted by default_rng([seed, s, c]) whatever N is, so one split's
    training sets are nested across N and adding a class leaves the others' draws unchanged.
    """
    labels = np.asarray(labels)
    train, test, used, left_out = [], [], [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < n_per_class + 1:
            left_out.append(int(c))
            continue
        order = members[np.random.default_rng([seed, split, int(c)]).permutation(len(members))]
        train.append(order[:n_per_class])
        rest = order[n_per_class:]
        test.append(rest if test_per_class is None else rest[:test_per_class])
        used.append(int(c))
    empty = np.zeros(0, dtype=np.int64)
    return FewShotSplit(
        np.sort(np.concatenate(train)) if train else empty,
        np.sort(np.concatenate(test)) if test else empty,
        used,
        left_out,
    )


def _relabel(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Labels as 0..K-1 indices into ``classes`` (left-out classes get no output unit)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[int(c)] for c in labels], dtype=np.int64)


# ------------------------------------------------------------------------- probes and baseline


def probe_accuracy(features: np.ndarray, labels: np.ndarray, fold: FewShotSplit, kind: str, l2: float, max_iter: int) -> float:
    """Mean per-class test accuracy of a linear probe trained on the split's training images."""
    y_train = _relabel(labels[fold.train], fold.classes)
    probe = fit_probe(features[fold.train], y_train, len(fold.classes), kind, l2=l2, max_iter=max_iter)
    predicted = probe.predict(features[fold.test]).numpy()
    return mean_class_accuracy(predicted, _relabel(labels[fold.test], fold.classes))


class _Subset:
    """The part of an ImageDataset that convviz.train's epoch loop reads, for a subset of images
    with relabelled classes (shares the parent's decoded-image cache)."""

    def __init__(self, dataset, indices: np.ndarray, labels: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.normalise = dataset.normalise

    def __len__(self) -> int:
        return len(self.indices)

    def raw_batch(self, idx):
        return self.dataset.raw_batch(self.indices[torch.as_tensor(idx, dtype=torch.long)])


def scratch_accuracy(
    model_name: str,
    arch_cfg: dict,
    dataset,
    labels: np.ndarray,
    fold: FewShotSplit,
    scratch: dict,
    train_cfg: dict,
    seed: int,
    device: torch.device,
) -> float:
    """Mean per-class test accuracy of the architecture trained from random init on the split's
    training images only (the paper's non-pretrained baseline), with the model's own training
    recipe (train_cfg: optimizer, lr, momentum, weight decay, warmup, clipping, bias centring) for scratch["epochs"]
    epochs of batch scratch["batch_size"] and a cosine schedule."""
    from convviz.models.registry import build_model
    from convviz.machine import busy_machine_threads, cpu_threads
    from convviz.train import _train_one_epoch, center_init, lr_factor, make_optimizer

    torch.manual_seed(seed)
    arch = {k: v for k, v in arch_cfg.items() if k != "weights"}
    model = build_model(model_name, len(fold.classes), dataset.image_size, arch).to(device)
    optimizer = make_optimizer(model, train_cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    renormalize = getattr(model, "renormalize_filters", None)
    train_set = _Subset(dataset, fold.train, _relabel(labels[fold.train], fold.classes))
    center_init(model, train_set, int(train_cfg.get("center_init", 0)), seed, device, lambda _m: None)
    cfg = {**train_cfg, "num_workers": 0}
    epochs = int(scratch["epochs"])
    # Small batches of small images on a busy CPU: one thread is several times faster than two
    # (measured: lenet 285 vs 65 img/s at load 10 on 2 cores); an idle machine keeps its threads.
    with cpu_threads(device, busy_machine_threads()):
        for epoch in range(1, epochs + 1):
            lr = train_cfg["lr"] * lr_factor("cosine", epoch - 1, epochs, 1, 1.0)
            _train_one_epoch(model, train_set, optimizer, scaler, device, seed, epoch, int(scratch["batch_size"]),
                             cfg, False, renormalize, lambda _m: None, lr)
        model.eval()
        predicted = []
        with torch.inference_mode():
            for start in range(0, len(fold.test), 64):
                idx = fold.test[start : start + 64]
                predicted.append(model(dataset.normalise(dataset.raw_batch(idx)).to(device)).argmax(dim=1).cpu())
    return mean_class_accuracy(torch.cat(predicted).numpy(), _relabel(labels[fold.test], fold.classes))


# ------------------------------------------------------------------------- the study


def _rows(model, target, probe, layer, n, split, metrics: dict) -> list[tuple]:
    return [(model, target, probe, layer, n, split, metric, float(value)) for metric, value in metrics.items()]


def classification_transfer(
    cache: FeatureCache, target: str, settings: dict, dataset=None, arch_cfg: dict | None = None,
    train_cfg: dict | None = None, log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Tables 4, 5, 7 rows for one model and a single-label target (see the module doc).

    The from-scratch baseline runs when ``dataset`` (the target's ImageDataset, all splits, in
    the cache's order) is given and settings["scratch"]["epochs"] > 0.
    """
    model_name, labels, seed = cache.model, cache.labels, int(settings["seed"])
    tcfg = settings["target"]
    shots = sorted(int(n) for n in tcfg["shots"])
    splits = int(settings["splits"])
    scratch = settings["scratch"]
    scratch_splits = splits if scratch.get("splits") is None else min(splits, int(scratch["splits"]))
    run_scratch = dataset is not None and int(scratch["epochs"]) > 0 and scratch_splits > 0
    device = resolve_device(settings["device"])
    penultimate = cache.penultimate
    rows: list[tuple] = []
    usable = []
    for n in shots:
        fold = few_shot_split(labels, n, seed, 0, tcfg.get("test_per_class"))
        if fold.left_out:
            names = [cache.classes[c] for c in fold.left_out]
            log(f"N={n}: {len(names)} class(es) have fewer than {n + 1} images and are left out: {names[:10]}"
                + (" ..." if len(names) > 10 else ""))
        if len(fold.classes) < 2:
            log(f"N={n}: fewer than 2 classes have {n + 1} images; N={n} is skipped")
            rows += _rows(model_name, target, "softmax", penultimate, n, 0, {"classes_used": len(fold.classes)})
            continue
        usable.append(n)
    largest = usable[-1] if usable else None

    for split in range(splits):
        t0 = time.time()
        for n in usable:
            fold = few_shot_split(labels, n, seed, split, tcfg.get("test_per_class"))
            counts = {"classes_used": len(fold.classes), "train_images": len(fold.train), "test_images": len(fold.test)}
            acc = probe_accuracy(cache.layers[penultimate], labels, fold, "softmax", settings["l2"], settings["max_iter"])
            rows += _rows(model_name, target, "softmax", penultimate, n, split, {"mean_class_accuracy": acc, **counts})
            if run_scratch and split < scratch_splits:
                acc = scratch_accuracy(model_name, arch_cfg or {}, dataset, labels, fold, scratch, train_cfg,
                                       seed * 1000 + split * 100 + n, device)
                rows += _rows(model_name, target, "scratch", WHOLE_NETWORK, n, split, {"mean_class_accuracy": acc, **counts})
            if n == largest:
                for layer, features in cache.layers.items():
                    for kind in ("softmax", "svm"):
                        if kind == "softmax" and layer == penultimate:
                            continue  # the row above
                        acc = probe_accuracy(features, labels, fold, kind, settings["l2"], settings["max_iter"])
                        rows += _rows(model_name, target, kind, layer, n, split, {"mean_class_accuracy": acc, **counts})
        done = [r for r in rows if r[5] == split and r[6] == "mean_class_accuracy" and r[3] == penultimate and r[2] == "softmax"]
        log(f"split {split + 1}/{splits}: softmax on {penultimate} "
            + ", ".join(f"N={r[4]} {100 * r[7]:.1f}%" for r in done) + f" ({time.time() - t0:.1f}s)")
    return _table(rows)


def multilabel_transfer(cache: FeatureCache, target: str, settings: dict, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Table 6 rows: independent sigmoids on the penultimate layer, trained on the train split,
    AP per class and mAP (over classes with a positive) on the val split."""
    if cache.multilabel is None:
        raise ValueError(f"{target}: the feature cache has no multi-label targets")
    train, test = cache.splits == "train", cache.splits == "val"
    if not train.any() or not test.any():
        raise ValueError(f"{target}: needs images in both the train and val splits (got {sorted(set(cache.splits))})")
    features = cache.layers[cache.penultimate]
    probe = fit_probe(features[train], cache.multilabel[train], len(cache.classes), "sigmoid",
                      l2=settings["l2"], max_iter=settings["max_iter"])
    scores = probe.scores(features[test]).numpy()
    truth = cache.multilabel[test].astype(bool)
    ap = {name: average_precision(scores[:, c], truth[:, c]) for c, name in enumerate(cache.classes)}
    valid = [v for v in ap.values() if not math.isnan(v)]
    mean_ap = float(np.mean(valid)) if valid else float("nan")
    missing = [name for name, v in ap.items() if math.isnan(v)]
    if missing:
        log(f"{target}: no positive val image for {missing}; their AP is NaN and mAP averages the other {len(valid)}")
    log(f"{target}: mAP {100 * mean_ap:.1f}% over {len(valid)} classes ({int(train.sum())} train / {int(test.sum())} val images)")
    metrics = {f"ap/{name}": v for name, v in ap.items()}
    metrics.update(map=mean_ap, classes_used=len(valid), train_images=int(train.sum()), test_images=int(test.sum()))
    return _table(_rows(cache.model, target, "sigmoid", cache.penultimate, pd.NA, 0, metrics))


def _table(rows: list[tuple]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=TRANSFER_COLUMNS)
    table["n_per_class"] = table["n_per_class"].astype("Int64")
    table["split"] = table["split"].astype("int64")
    return table


def run_transfer(model_name: str, target: str, features_path, target_dir, checkpoint, settings: dict,
                 train_cfg: dict, out_path, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Rule transfer: every probe of one model on one target; writes transfer.parquet rows."""
    from convviz.io import write_parquet
    from convviz.models.checkpoint import load_checkpoint

    t0 = time.time()
    cache = load_feature_cache(features_path)
    if cache.model != model_name:
        raise ValueError(f"feature cache {features_path} holds {cache.model} features, not {model_name}'s")
    if cache.multilabel is not None:
        table = multilabel_transfer(cache, target, settings, log)
    else:
        dataset = arch_cfg = None
        if int(settings["scratch"]["epochs"]) > 0:
            meta = load_checkpoint(checkpoint)
            arch_cfg = dict(meta["arch_cfg"])
            dataset = open_split(target_dir, None, int(meta["input_size"]))
            if list(dataset.manifest["image_id"]) != list(cache.image_ids):
                raise ValueError(f"feature cache {features_path} does not match {target_dir}; rerun rule transfer_features")
        table = classification_transfer(cache, target, settings, dataset, arch_cfg, train_cfg, log)
    write_parquet(table, out_path)
    log(f"done: {model_name} on {target}: {len(table)} rows in {time.time() - t0:.1f}s")
    return table
