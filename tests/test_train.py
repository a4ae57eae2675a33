"""Training: checkpoints and history as promised, and exact resume after an interruption."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from convviz.models.checkpoint import load_checkpoint
from convviz.data.common import ImageDataset
from convviz.models.registry import build_model
from convviz.train import TrainOutputs, _train_one_epoch, evaluate, lr_factor, make_optimizer, train_model

SETTINGS = {
    "epochs": 3, "lr": 0.05, "schedule": "cosine", "step_size": 5, "gamma": 0.1, "batch_size": 8,
    "momentum": 0.9, "weight_decay": 0.0005, "augment": True, "amp": True, "channels_last": True,
    "num_workers": 0, "threads": 1, "checkpoint_epochs": [1, 3], "center_init": 16,
}


def outputs(tmp: Path) -> TrainOutputs:
    return TrainOutputs(final=tmp / "final.pt", history=tmp / "history.parquet",
                        checkpoint_dir=tmp / "ckpt", resume=tmp / "resume" / "last.pt", curves=tmp / "curves.png")


def run(tmp, data, log=lambda m: None, settings=None, **kw):
    return train_model("lenet", data, outputs(tmp), arch_cfg={}, train_cfg=settings or SETTINGS, seed=3, device="cpu",
                       log=log, **kw)


def assert_same_weights(a: Path, b: Path):
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_training_writes_history_checkpoints_and_curves(tmp_path, tiny_dataset):
    history = run(tmp_path, tiny_dataset)
    assert list(history.columns) == ["epoch", "split", "loss", "top1", "top5", "lr", "seconds", "resumed_from_epoch"]
    assert set(history["resumed_from_epoch"]) == {0}
    assert len(history) == 6 and set(history["split"]) == {"train", "val"}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_001.pt", "epoch_003.pt"]
    ckpt = load_checkpoint(tmp_path / "final.pt")
    assert ckpt["model"] == "lenet" and ckpt["epoch"] == 3 and ckpt["num_classes"] == 3
    assert pd.read_parquet(tmp_path / "history.parquet").equals(history)
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, tiny_dataset, optimizer):
    # AdamW's moment estimates and step count are part of the resume state, as SGD's momentum is.
    settings = {**SETTINGS, "optimizer": optimizer, **({"lr": 0.002, "weight_decay": 0.05} if optimizer == "adamw" else {})}
    run(tmp_path / "straight", tiny_dataset, settings=settings)
    run(tmp_path / "resumed", tiny_dataset, settings=settings, stop_after_epoch=1)
    assert not (tmp_path / "resumed" / "final.pt").exists()
    history = run(tmp_path / "resumed", tiny_dataset, settings=settings)
    assert_same_weights(tmp_path / "straight" / "final.pt", tmp_path / "resumed" / "final.pt")
    assert list(history["epoch"]) == [1, 1, 2, 2, 3, 3]
    assert list(history["resumed_from_epoch"]) == [0, 0, 1, 1, 1, 1]  # the history records the resume


def test_a_resumed_job_publishes_the_checkpoints_of_epochs_before_the_kill(tmp_path, tiny_dataset):
    """Snakemake deletes a failed job's outputs, the checkpoint directory among them, before the
    rerun: the epochs saved before the interruption must still end up there."""
    import shutil

    run(tmp_path, tiny_dataset, stop_after_epoch=1)
    shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)  # what Snakemake does before the rerun
    history = run(tmp_path, tiny_dataset)
    assert list(history["resumed_from_epoch"]) == [0, 0, 1, 1, 1, 1]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_001.pt", "epoch_003.pt"]
    assert load_checkpoint(tmp_path / "ckpt" / "epoch_001.pt")["epoch"] == 1


def test_a_finished_run_leaves_no_resume_state_so_a_rerun_trains_afresh(tmp_path, tiny_dataset):
    """Rerunning a completed job (Snakemake does when its code or config changes) must train
    again, not "resume" after the last epoch with nothing to do and no epoch checkpoints."""
    import shutil

    run(tmp_path, tiny_dataset)
    assert not (tmp_path / "resume" / "last.pt").exists() and not list((tmp_path / "resume").glob("*.pt"))
    shutil.rmtree(tmp_path / "ckpt")
    (tmp_path / "final.pt").unlink()
    lines = []
    history = run(tmp_path, tiny_dataset, log=lines.append)
    assert any("from scratch" in line for line in lines)
    assert set(history["resumed_from_epoch"]) == {0}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_001.pt", "epoch_003.pt"]


@pytest.mark.parametrize("stop_after, lost", [(3, ["epoch_001.pt", "epoch_003.pt"]), (2, ["epoch_001.pt"])])
def test_a_state_whose_earlier_checkpoints_are_gone_is_not_resumed(tmp_path, tiny_dataset, stop_after, lost):
    """A resume state left by an older version, which wrote epoch checkpoints straight to the
    output directory (deleted by Snakemake since): finished (epoch 3 of 3) or interrupted after
    epoch 2. Resuming would never publish the lost epochs, so the run trains afresh."""
    run(tmp_path, tiny_dataset, stop_after_epoch=stop_after)
    for name in lost:
        (tmp_path / "resume" / name).unlink()
    lines = []
    history = run(tmp_path, tiny_dataset, log=lines.append)
    assert any("checkpoints of the epochs it covers are gone" in line for line in lines)
    assert set(history["resumed_from_epoch"]) == {0}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_001.pt", "epoch_003.pt"]


def test_biases_are_centred_when_training_starts_from_scratch_not_on_resume(tmp_path, tiny_dataset):
    first, second = [], []
    run(tmp_path, tiny_dataset, log=first.append, stop_after_epoch=1)
    run(tmp_path, tiny_dataset, log=second.append)
    centred = [m for m in first if m.startswith("centred the biases")]
    assert centred == ["centred the biases of 4 layer(s) on 16 training images: "
                       "features.0, features.3, classifier.1, classifier.4"]  # all but the head
    assert not any(m.startswith("centred") for m in second)


def test_resume_state_of_another_configuration_is_ignored(tmp_path, tiny_dataset):
    run(tmp_path, tiny_dataset, stop_after_epoch=1)
    messages = []
    other = dict(SETTINGS, lr=0.01)
    train_model("lenet", tiny_dataset, outputs(tmp_path), arch_cfg={}, train_cfg=other, seed=3, device="cpu",
                log=messages.append)
    assert any("different configuration" in m for m in messages)


def test_the_optimizer_is_the_configured_one_with_its_rate_and_decay():
    model = torch.nn.Linear(3, 2)
    sgd = make_optimizer(model, {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.001})  # sgd when the key is absent
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.8 and sgd.defaults["weight_decay"] == 0.001
    adamw = make_optimizer(model, {"optimizer": "adamw", "lr": 0.002, "momentum": 0.9, "weight_decay": 0.05})
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["lr"] == 0.002 and adamw.defaults["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="train.optimizer.*'adam'.*sgd or adamw"):
        make_optimizer(model, {"optimizer": "adam", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0})


def test_the_optimizer_is_fused_on_a_gpu_and_torch_s_usual_one_elsewhere():
    # Fused steps let GradScaler skip a step on the GPU instead of reading found_inf on the host.
    model = torch.nn.Linear(3, 2)
    settings = {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.001}
    assert not make_optimizer(model, settings).defaults.get("fused")  # CPU parameters
    for kind in ("sgd", "adamw"):
        assert make_optimizer(model, {**settings, "optimizer": kind}, fused=True).defaults["fused"] is True


def _epoch_setup(data: Path, lr: float):
    dataset = ImageDataset(data, "train", 64)
    torch.manual_seed(0)
    model = build_model("lenet", dataset.num_classes, 64, {})
    return dataset, model, {**SETTINGS, "lr": lr}


def _one_epoch(dataset, model, optimizer, cfg, log=lambda m: None, batch_size=4):
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    return _train_one_epoch(model, dataset, optimizer, scaler, torch.device("cpu"), 3, 1, batch_size, cfg, False, None, log,
                            cfg["lr"])


def test_an_epoch_reads_values_off_the_device_only_at_its_report_points(tiny_dataset, monkeypatch):
    # On a GPU each read (float, int, bool, item of a tensor) makes the host wait for the device;
    # once per batch they made the H100 loop 26-46% slower than a bare step. 30 images in batches
    # of 4 = 8 batches, reported after batches 2, 4 and 6, then the epoch's totals. Counted: the
    # reads made by the training module itself (the dataset reads its host-side indices).
    dataset, model, cfg = _epoch_setup(tiny_dataset, 0.01)
    optimizer = make_optimizer(model, cfg)
    reads = []
    for name in ("__float__", "__int__", "__bool__", "item"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if Path(caller).parts[-2:] == ("convviz", "train.py"):
                reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    logged = []
    stats = _one_epoch(dataset, model, optimizer, cfg, logged.append)
    monkeypatch.undo()
    assert len(logged) == 3
    # Per check: the first bad batch; per report: the loss; at the end also top-1 and top-5.
    assert len(reads) == 3 * 2 + 4, reads
    assert 0 < stats["loss"] < 10 and 0 <= stats["top1"] <= stats["top5"] <= 1


def test_a_non_finite_loss_names_its_epoch_and_first_batch(tiny_dataset):
    # The first step blows the weights up; in batches of 2 the first check comes after batch 2,
    # when batches 1 and 2 have both gone bad.
    dataset, model, cfg = _epoch_setup(tiny_dataset, 1e30)
    optimizer = make_optimizer(model, cfg)
    with pytest.raises(FloatingPointError, match=r"training loss became (nan|inf) at epoch 1, batch 1; lower train.lr"):
        _one_epoch(dataset, model, optimizer, cfg, batch_size=2)


def test_a_fused_optimizer_trains_as_the_usual_one(tiny_dataset):
    # The GPU default (fused) goes through the same loop; on the CPU both kernels exist.
    results = {}
    for fused in (False, True):
        dataset, model, cfg = _epoch_setup(tiny_dataset, 0.01)
        results[fused] = (_one_epoch(dataset, model, make_optimizer(model, cfg, fused=fused), cfg), model.state_dict())
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, rtol=1e-4, atol=1e-6)


def test_evaluation_totals_equal_a_direct_computation(tiny_dataset):
    dataset, model, _ = _epoch_setup(tiny_dataset, 0.01)
    val = ImageDataset(tiny_dataset, "val", 64)
    stats = evaluate(model, val, torch.device("cpu"), batch_size=5, amp=False)  # 12 images: a short last batch
    model.eval()
    with torch.no_grad():
        logits = model(val.normalise(val.raw_batch(torch.arange(len(val)))))
    labels = val.labels
    assert stats["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)  # classes scoring above the true one
    assert stats["top1"] == pytest.approx(float((ranks < 1).float().mean()))
    assert stats["top5"] == pytest.approx(float((ranks < 5).float().mean()))


def test_lr_schedules():
    assert lr_factor("constant", 7, 10, 5, 0.1) == 1.0
    assert lr_factor("step", 4, 10, 5, 0.1) == 1.0 and lr_factor("step", 5, 10, 5, 0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 0, 10, 5, 0.1) == 1.0 and lr_factor("cosine", 5, 10, 5, 0.1) == pytest.approx(0.5)


DRIVER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    torch.set_num_threads(1)
    from convviz.train import TrainOutputs, train_model
    tmp, data = Path(sys.argv[1]), sys.argv[2]
    settings = dict(epochs=3, lr=0.01, schedule="step", step_size=2, gamma=0.5, batch_size=4, momentum=0.9,
                    weight_decay=0.0005, augment=True, amp=False, channels_last=False, num_workers=0, threads=1,
                    checkpoint_epochs=[3])
    out = TrainOutputs(final=tmp / "final.pt", history=tmp / "history.parquet", checkpoint_dir=tmp / "ckpt",
                       resume=tmp / "resume" / "last.pt")
    train_model("zfnet", data, out, arch_cfg={"fc_width": 16}, train_cfg=settings, seed=1, device="cpu")
    """
)


def test_training_killed_mid_epoch_resumes_to_identical_weights(tmp_path, tiny_dataset):
    """SIGKILL during epoch 2 (after epoch 1's resume state exists), rerun, compare with a straight run."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run([sys.executable, driver, straight, tiny_dataset], check=True, env=env, capture_output=True)

    proc = subprocess.Popen([sys.executable, driver, killed, tiny_dataset], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (killed / "resume" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first epoch was saved"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.pt").exists()

    out = subprocess.run([sys.executable, driver, killed, tiny_dataset], check=True, env=env,
                         capture_output=True, text=True).stdout
    assert "resuming zfnet from epoch" in out
    assert_same_weights(straight / "final.pt", killed / "final.pt")


def test_keep_freed_memory_applies_on_glibc_and_declines_elsewhere(monkeypatch):
    """Rule train's allocator setting (convviz.machine.keep_freed_memory): every mallopt call is
    accepted on glibc (in a child process: the setting is process-wide), and a C library without
    mallopt (macOS, musl) gets False, not an error. Its effect on page faults is measured in the
    README (training-throughput section), not asserted here: how many faults the default
    allocator takes varies from run to run."""
    import ctypes
    import platform

    from convviz import machine

    if platform.libc_ver()[0] == "glibc":
        child = subprocess.run([sys.executable, "-c", "from convviz.machine import keep_freed_memory as k; print(k())"],
                               cwd=Path(__file__).resolve().parent.parent, check=True, capture_output=True, text=True)
        assert child.stdout.strip() == "True"

    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert machine.keep_freed_memory() is False
