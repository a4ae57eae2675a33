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
from convviz.train import TrainOutputs, lr_factor, make_optimizer, train_model

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
