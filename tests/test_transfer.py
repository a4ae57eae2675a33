"""Transfer probes (Sec. 5.2, Tables 4-7): linear probes, the paper's metrics, the few-shot
protocol, the feature cache, the from-scratch baseline and the Caltech/VOC target paths."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from convviz.config import ConfigError, target_settings, transfer_settings, transfer_targets, validate_config
from convviz.data.build import build_dataset
from convviz.data.common import DatasetError, write_dataset_tables
from convviz.layer_features import pool_feature_map
from convviz.models.checkpoint import save_checkpoint
from convviz.models.registry import build_model
from convviz.probes import average_precision, fit_probe, mean_class_accuracy
from convviz.transfer import (
    TRANSFER_COLUMNS,
    classification_transfer,
    extract_target_features,
    few_shot_split,
    load_feature_cache,
    multilabel_transfer,
    run_transfer,
)
from convviz.transfer_summary import accuracy_table, best_model, summary_markdown
from test_real_datasets import caltech101_tree, caltech256_tree, voc_tree

SIZE = 32  # the smallest data.image_size the config allows


def separable(classes=4, per_class=30, dim=20, seed=0):
    """Gaussian clusters around far-apart class centres: linearly separable with a wide margin."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return (centres[labels] + rng.normal(0, 0.5, (len(labels), dim))).astype(np.float32), labels


def settings(**over):
    base = {
        "splits": 2, "pool_size": 2, "l2": 0.01, "max_iter": 50, "seed": 0, "device": "cpu",
        "analysis": {"batch_size": 8, "threads": 1},
        "scratch": {"epochs": 0, "batch_size": 4, "splits": 1},
        "target": {"name": "t", "shots": [1, 2], "test_per_class": None},
    }
    base.update(over)
    return base


# ----------------------------------------------------------------------------- probes and metrics


@pytest.mark.parametrize("kind", ["softmax", "svm"])
def test_linearly_separable_features_are_classified_perfectly_on_held_out_vectors(kind):
    x, y = separable()
    train = np.arange(len(y)) % 3 != 0
    probe = fit_probe(x[train], y[train], 4, kind)
    assert (probe.predict(x[~train]).numpy() == y[~train]).mean() == 1.0


def test_probe_on_uninformative_features_stays_near_chance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 10)).astype(np.float32), rng.integers(0, 4, 400)
    probe = fit_probe(x[:200], y[:200], 4, "softmax")
    assert (probe.predict(x[200:]).numpy() == y[200:]).mean() < 0.4


def test_sigmoid_probe_ranks_every_positive_first_on_separable_multilabel_data():
    x, y = separable(classes=3, per_class=20)
    targets = np.stack([y == 0, (y == 1) | (y == 2), y == 2], axis=1).astype(np.float32)
    probe = fit_probe(x, targets, 3, "sigmoid")
    scores = probe.scores(x).numpy()
    assert [average_precision(scores[:, c], targets[:, c] > 0) for c in range(3)] == [1.0, 1.0, 1.0]


def test_mean_class_accuracy_matches_a_hand_computation():
    labels = [0, 0, 0, 1, 2, 2]
    predictions = [0, 0, 1, 1, 0, 1]
    # class 0: 2/3, class 1: 1/1, class 2: 0/2 -> mean 5/9 (overall accuracy would be 3/6)
    assert mean_class_accuracy(predictions, labels) == pytest.approx(5 / 9)
    with pytest.raises(ValueError, match="class 3 has no test images"):
        mean_class_accuracy(predictions, labels, classes=[0, 1, 2, 3])


def brute_force_voc_ap(scores, positives) -> float:
    """VOC 2010+ AP spelled out: for the k-th of P positives, the best precision at any rank
    whose recall is at least k/P; the mean of those over k."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    total = sum(positives)
    precision, recall, hits = [], [], 0
    for rank, i in enumerate(order, start=1):
        hits += positives[i]
        precision.append(hits / rank)
        recall.append(hits / total)
    return sum(max(p for p, r in zip(precision, recall) if r >= k / total - 1e-12) for k in range(1, total + 1)) / total


def test_average_precision_matches_hand_values_and_a_brute_force_oracle():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # Precision at the hits is 1, 2/4, 3/5; VOC interpolation lifts the middle one to 3/5.
    assert average_precision([5, 4, 3, 2, 1], [1, 0, 0, 1, 1]) == pytest.approx((1 + 0.6 + 0.6) / 3)
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 30))
        scores = rng.permutation(n).astype(float)  # distinct scores: no tie-order question
        positives = rng.random(n) < 0.4
        if not positives.any():
            positives[0] = True
        assert average_precision(scores, positives) == pytest.approx(brute_force_voc_ap(list(scores), list(positives)))


# ----------------------------------------------------------------------------- protocol


def test_few_shot_split_takes_n_per_class_disjoint_nested_and_seeded():
    labels = np.repeat([0, 1, 2], [10, 12, 3])
    small, large = few_shot_split(labels, 2, 0, 0), few_shot_split(labels, 5, 0, 0)
    for fold, n in ((small, 2), (large, 5)):
        assert not set(fold.train) & set(fold.test)
        assert all((labels[fold.train] == c).sum() == n for c in fold.classes)
    assert small.classes == [0, 1, 2] and large.classes == [0, 1] and large.left_out == [2]
    assert set(small.train) - {i for i in small.train if labels[i] == 2} <= set(large.train)  # nested across N
    assert set(small.test) | set(small.train) == set(range(25))  # no cap: every other image is a test image
    again = few_shot_split(labels, 2, 0, 0)
    assert np.array_equal(again.train, small.train)
    assert not np.array_equal(few_shot_split(labels, 2, 0, 1).train, small.train)
    assert (labels[few_shot_split(labels, 2, 0, 0, test_per_class=3).test] == 1).sum() == 3


def test_pooled_features_average_quadrants_and_keep_fc_outputs():
    fmap = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    pooled = pool_feature_map(fmap, 2)
    assert pooled.shape == (2, 3 * 2 * 2)
    assert pooled[1, 4 + 3] == fmap[1, 1, 2:, 2:].mean()  # channel 1, bottom-right quadrant
    assert pool_feature_map(fmap[..., :1, :1], 2).shape == (2, 3)  # a 1x1 map is not blown up
    fc = torch.randn(2, 7)
    assert pool_feature_map(fc, 2) is fc


# ----------------------------------------------------------------------------- cache and baseline


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """A 3-class synthetic target (6 images per class) and an untrained lenet checkpoint."""
    from convviz.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("target")
    generate_synthetic(root / "data", seed=0, image_size=32, classes=3, train_per_class=4, val_per_class=2,
                       distractors=0, target=True, log=lambda m: None)
    torch.manual_seed(0)
    model = build_model("lenet", 3, 32)
    save_checkpoint(root / "lenet.pt", "lenet", model, epoch=0, num_classes=3, input_size=32, arch_cfg={})
    return root


def test_features_are_extracted_once_and_every_probe_reads_the_cache(tiny_target, tmp_path, monkeypatch):
    from convviz.analysis import load_for_analysis, open_split
    from convviz.deconv import forward_to
    from convviz.models.registry import layer_modules

    cache = extract_target_features(tiny_target / "lenet.pt", tiny_target / "data", tmp_path / "f.npz", settings(), log=lambda m: None)
    model, _ = load_for_analysis(tiny_target / "lenet.pt")
    dataset = open_split(tiny_target / "data", None, 32)
    images = dataset.normalise(dataset.raw_batch(range(len(dataset))))
    for layer, module in layer_modules(model, "lenet").items():
        expected = pool_feature_map(forward_to(model, module, images), 2)
        assert np.allclose(cache.layers[layer], expected.numpy(), atol=1e-5), layer
    assert list(cache.image_ids) == list(dataset.manifest["image_id"]) and cache.penultimate == "fc4"

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr("convviz.transfer.extract_features", no_extraction)
    monkeypatch.setattr("convviz.layer_features.extract_features", no_extraction)
    table = run_transfer("lenet", "synthetic_target", tmp_path / "f.npz", tiny_target / "data", tiny_target / "lenet.pt",
                         settings(), {}, tmp_path / "probes.parquet", log=lambda m: None)
    assert list(table.columns) == TRANSFER_COLUMNS
    acc = table[table["metric"] == "mean_class_accuracy"]
    # softmax on fc4 for both N; at the largest N softmax on the 3 other layers and SVM on all 4.
    assert len(acc) == 2 * (2 + 3 + 4)
    assert set(acc["n_per_class"]) == {1, 2} and set(acc["split"]) == {0, 1}
    assert acc["value"].between(0, 1).all()


def test_a_class_with_fewer_than_n_images_is_reported_and_left_out(tiny_target, tmp_path):
    cache = extract_target_features(tiny_target / "lenet.pt", tiny_target / "data", tmp_path / "f.npz", settings(), log=lambda m: None)
    keep = np.ones(len(cache.labels), bool)
    keep[np.flatnonzero(cache.labels == 2)[2:]] = False  # class 2 keeps only 2 images
    for layer in cache.layers:
        cache.layers[layer] = cache.layers[layer][keep]
    cache.labels = cache.labels[keep]
    messages = []
    table = classification_transfer(cache, "t", settings(target={"shots": [1, 2], "test_per_class": None}), log=messages.append)
    used = table[(table["metric"] == "classes_used") & (table["probe"] == "softmax") & (table["layer"] == "fc4")]
    assert set(used.loc[used["n_per_class"] == 1, "value"]) == {3.0}
    assert set(used.loc[used["n_per_class"] == 2, "value"]) == {2.0}
    assert any("left out" in m and "N=2" in m for m in messages)


def write_colour_dataset(root, size=32, per_class=10):
    """Two classes of solid-colour images (red, blue) with a little noise: trivially learnable."""
    rng = np.random.default_rng(0)
    rows = []
    for label, colour in enumerate(([200, 30, 30], [30, 30, 200])):
        for k in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
            path = root / "images" / f"c{label}_{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.fromarray(pixels).save(path)
            rows.append({"image_id": f"c{label}_{k}", "split": "train", "label": label, "class_name": ["red", "blue"][label], "path": str(path)})
    meta = {"name": "colours", "classes": ["red", "blue"], "image_size": size, "mean": [0.45, 0.2, 0.45], "std": [0.3, 0.1, 0.3], "multilabel": False}
    write_dataset_tables(root, pd.DataFrame(rows), None, meta)
    return root


def test_from_scratch_baseline_trains_the_architecture_on_the_split_images_only(tmp_path):
    from convviz.analysis import open_split
    from convviz.transfer import scratch_accuracy

    dataset = open_split(write_colour_dataset(tmp_path), None, 32)
    labels = dataset.labels.numpy()
    fold = few_shot_split(labels, 4, 0, 0)
    recipe = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "warmup_epochs": 0, "grad_clip": None, "augment": False}
    trained = scratch_accuracy("lenet", {}, dataset, labels, fold, {"epochs": 10, "batch_size": 4}, recipe, 0, torch.device("cpu"))
    untrained = scratch_accuracy("lenet", {}, dataset, labels, fold, {"epochs": 0, "batch_size": 4}, recipe, 0, torch.device("cpu"))
    assert trained == 1.0 and untrained < 1.0


# ----------------------------------------------------------------------------- real targets


def caltech_config(tmp_path, name, root, **own):
    config = {"data": {"image_size": SIZE}, "transfer": {"targets": {name: {"enabled": True, "root": str(root), **own}}}}
    return validate_config(config)


@pytest.mark.parametrize(("name", "build"), [("caltech101", caltech101_tree), ("caltech256", caltech256_tree)])
def test_caltech_tree_flows_through_the_target_exporter_into_the_probes(tmp_path, name, build):
    root = build(tmp_path / "root")
    config = caltech_config(tmp_path, name, root, shots=[1, 2])
    assert transfer_targets(config) == ["synthetic_target", name]
    build_dataset(target_settings(config, name), tmp_path / "target", log=lambda m: None)
    manifest = pd.read_parquet(tmp_path / "target" / "manifest.parquet")
    assert len(manifest) == 12 and manifest["class_name"].nunique() == 3  # background/clutter dropped
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lenet.pt", "lenet", build_model("lenet", 2, SIZE), epoch=0, num_classes=2, input_size=SIZE, arch_cfg={})
    study = transfer_settings(config, name)
    assert study["target"]["shots"] == [1, 2] and study["target"]["name"] == name and "targets" not in study
    study.update(splits=2, max_iter=20, scratch={"epochs": 1, "batch_size": 2, "splits": 1})
    extract_target_features(tmp_path / "lenet.pt", tmp_path / "target", tmp_path / "f.npz", study, log=lambda m: None)
    table = run_transfer("lenet", name, tmp_path / "f.npz", tmp_path / "target", tmp_path / "lenet.pt", study,
                         {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "augment": True}, tmp_path / "p.parquet", log=lambda m: None)
    acc = table[table["metric"] == "mean_class_accuracy"]
    assert set(acc["probe"]) == {"softmax", "svm", "scratch"}
    # 4 images per class pooled over the exporter's train/val split: N + test = 4.
    counts = table[(table["metric"] == "test_images") & (table["probe"] == "softmax") & (table["layer"] == "fc4")]
    assert set(counts.loc[counts["n_per_class"] == 2, "value"]) == {6.0}


def test_voc_tree_gets_per_class_average_precision_on_val(tmp_path):
    root = voc_tree(tmp_path / "voc")
    config = caltech_config(tmp_path, "voc2012", root)
    build_dataset(target_settings(config, "voc2012"), tmp_path / "target", log=lambda m: None)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lenet.pt", "lenet", build_model("lenet", 20, SIZE), epoch=0, num_classes=20, input_size=SIZE, arch_cfg={})
    study = transfer_settings(config, "voc2012")
    extract_target_features(tmp_path / "lenet.pt", tmp_path / "target", tmp_path / "f.npz", study, log=lambda m: None)
    cache = load_feature_cache(tmp_path / "f.npz")
    assert cache.multilabel.shape == (5, 20) and cache.multilabel.sum() == 6  # the two birds and two aeroplanes count once
    table = run_transfer("lenet", "voc2012", tmp_path / "f.npz", tmp_path / "target", tmp_path / "lenet.pt", study, {},
                         tmp_path / "p.parquet", log=lambda m: None)
    ap = table[table["metric"].str.startswith("ap/")].set_index("metric")["value"]
    assert len(ap) == 20 and table["n_per_class"].isna().all()
    # val images: 2008_000004 (tvmonitor), 2008_000005 (aeroplane): only those two classes have an AP.
    assert set(ap.dropna().index) == {"ap/tvmonitor", "ap/aeroplane"}
    mean_ap = table.loc[table["metric"] == "map", "value"].item()
    assert mean_ap == pytest.approx(ap.dropna().mean())
    # Two val images, one positive each: AP is 1 when the positive scores higher, else 1/2.
    assert set(ap.dropna()) <= {1.0, 0.5}


def test_target_root_without_the_layout_names_the_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    config = caltech_config(tmp_path, "caltech101", tmp_path / "empty")
    with pytest.raises(DatasetError, match=str(tmp_path / "empty" / "caltech101" / "101_ObjectCategories")):
        build_dataset(target_settings(config, "caltech101"), tmp_path / "target", log=lambda m: None)


def test_an_enabled_real_target_without_root_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"transfer\.targets\.caltech256\.root"):
        validate_config({"transfer": {"targets": {"caltech256": {"enabled": True}}}})
    default = validate_config({})
    assert transfer_targets(default) == ["synthetic_target"]
    assert default["transfer"]["targets"]["caltech101"]["shots"] == [15, 30]
    assert default["transfer"]["targets"]["caltech256"]["shots"] == [15, 30, 45, 60]


# ----------------------------------------------------------------------------- summary


def test_best_model_is_the_best_final_validation_top1_and_is_listed_first(tmp_path):
    histories = {}
    for model, top1 in (("lenet", [0.5, 0.6]), ("zfnet", [0.9, 0.7]), ("alexnet", [0.2, 0.75])):
        path = tmp_path / f"{model}.parquet"
        pd.DataFrame({"epoch": [1, 2, 1, 2], "split": ["val", "val", "train", "train"], "top1": top1 + [1.0, 1.0]}).to_parquet(path)
        histories[model] = path
    best, top1 = best_model(histories)
    assert best == "alexnet" and top1["zfnet"] == 0.7  # the final epoch counts, not the best one
    rows = [("lenet", "caltech101", "softmax", "fc4", 15, s, "mean_class_accuracy", v) for s, v in enumerate((0.5, 0.7))]
    rows += [("alexnet", "caltech101", "softmax", "fc7", 15, s, "mean_class_accuracy", 0.8) for s in range(2)]
    rows += [("alexnet", "caltech101", "svm", "conv1", 30, s, "mean_class_accuracy", 0.4) for s in range(2)]
    table = pd.DataFrame(rows, columns=TRANSFER_COLUMNS)
    summary = accuracy_table(table, best, {"lenet": "fc4", "alexnet": "fc7"})
    assert summary["model"].iloc[0] == "alexnet" and summary["best_model"].iloc[0]
    lenet = summary[summary["model"] == "lenet"].iloc[0]
    assert lenet["mean_pct"] == pytest.approx(60.0) and lenet["std_pct"] == pytest.approx(np.std([50, 70], ddof=1))
    assert lenet["paper_mean_pct"] == 83.8  # Table 4, 15 per class
    svm = summary[summary["probe"] == "svm"].iloc[0]
    assert svm["paper_mean_pct"] == 44.8  # Table 7, layer 1 at 30 per class
    assert "**alexnet**" in summary_markdown(summary, best, top1)


# ----------------------------------------------------------------------------- workflow


def planned(workdir, *configfiles) -> list[tuple[str, str]]:
    import re

    from conftest import snakemake

    out = snakemake(workdir, "-n", "--configfile", *map(str, configfiles)).stdout
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if m:
            model = re.search(r"model=(\w+)", block)
            jobs.append((m.group(1), model.group(1) if model else ""))
    return jobs


@pytest.mark.workflow
def test_smoke_run_writes_the_transfer_table_for_every_model(smoke_run):
    table = pd.read_parquet(smoke_run / "results/transfer/transfer.parquet")
    assert list(table.columns) == TRANSFER_COLUMNS
    models = ["lenet", "alexnet", "zfnet", "resnet50"]
    assert set(table["model"]) == set(models) and set(table["target"]) == {"synthetic_target"}
    acc = table[table["metric"] == "mean_class_accuracy"]
    assert acc["value"].between(0, 1).all()
    assert set(acc["n_per_class"]) == {2, 4} and set(acc["split"]) == {0, 1}
    scratch = acc[acc["probe"] == "scratch"]
    assert set(scratch["split"]) == {0} and set(scratch["model"]) == set(models)  # scratch.splits: 1
    summary = json.loads((smoke_run / "results/transfer/transfer_summary.json").read_text())
    best, _ = best_model({m: smoke_run / f"results/models/{m}/history.parquet" for m in models})
    assert summary["best_model"] == best and table["model"].iloc[0] == best
    assert (smoke_run / "results/transfer/figures/synthetic_target.png").stat().st_size > 10_000
    assert "(best)" in (smoke_run / "results/transfer/transfer_summary.md").read_text()


@pytest.mark.workflow
def test_editing_probe_settings_reuses_the_cached_features(smoke_run, tmp_path):
    (tmp_path / "shots.yaml").write_text("transfer:\n  targets:\n    synthetic_target: {shots: [1, 3]}\n")
    jobs = planned(smoke_run, "configs/smoke.yaml", tmp_path / "shots.yaml")
    assert {j for j in jobs if j[0] == "transfer"} == {("transfer", m) for m in ("lenet", "alexnet", "zfnet", "resnet50")}
    assert not [j for j in jobs if j[0] in ("transfer_features", "train", "compare")]
    (tmp_path / "pool.yaml").write_text("transfer:\n  pool_size: 1\n")
    assert ("transfer_features", "zfnet") in planned(smoke_run, "configs/smoke.yaml", tmp_path / "pool.yaml")
