"""Training: SGD with momentum as the paper's Sec. 3 (or AdamW, `train.optimizer`), checkpoints for Fig. 4, exact resume.

Every epoch's randomness (shuffle order, flips, dropout) is seeded from (seed, epoch) alone, so a
job killed after epoch k and rerun from its `last` checkpoint ends with the same weights as an
uninterrupted run on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from convviz.data.common import ImageDataset
from convviz.io import save_torch, write_parquet
from convviz.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from convviz.models.data_init import center_biases, centred_layers
from convviz.models.registry import build_model

RESUME_FORMAT = "convviz-resume-v1"
HISTORY_COLUMNS = ["epoch", "split", "loss", "top1", "top5", "lr", "seconds", "resumed_from_epoch"]


@dataclass
class TrainOutputs:
    """Where the training step writes: final weights, per-epoch history, Fig. 4 checkpoints."""

    final: Path
    history: Path
    checkpoint_dir: Path
    resume: Path
    curves: Path | None = None


def resolve_device(device: str) -> torch.device:
    """auto -> CUDA when available; asking for cuda without one is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device: cuda was requested but torch sees no CUDA device; use device: auto or cpu")
    return torch.device(device)


def fingerprint(model_name: str, arch_cfg: dict, train_cfg: dict, seed: int, data_meta: dict, n_train: int) -> str:
    """Identifies a training run; a resume state from a different run is ignored, never mixed in."""
    blob = json.dumps(
        {"model": model_name, "arch": arch_cfg, "train": train_cfg, "seed": seed, "data": data_meta, "n": n_train},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lr_factor(schedule: str, epoch_index: int, epochs: int, step_size: int, gamma: float) -> float:
    """Multiplier of the base learning rate for 0-based epoch_index."""
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return gamma ** (epoch_index // step_size)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch_index / max(epochs, 1)))
    raise ValueError(f"unknown schedule {schedule!r}; use constant, step or cosine")


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows have their label among the k largest logits, as a 0-d tensor on their device
    (read it when needed: an int would make a GPU wait for every batch)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).sum()


class _Tally:
    """Loss and top-1/top-5 counts summed over batches on the device, read only when reported:
    reading a GPU value after every batch stops the host from queueing the next batch's work
    (with about five such waits per step the loop ran 26-46% slower than a bare step on an H100).
    The first non-finite loss is kept too, with its batch, so the error can name it."""

    def __init__(self, device: torch.device) -> None:
        # float64 where the device has it (MPS does not): the host summed in double before.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.loss = torch.zeros((), dtype=dtype, device=device)
        self.top1 = torch.zeros((), dtype=torch.long, device=device)
        self.top5 = torch.zeros((), dtype=torch.long, device=device)
        self.bad_batch = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.total = 0

    def add(self, loss_sum: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """loss_sum: the batch's summed loss (0-d); logits, labels: the batch's."""
        self.total += len(labels)
        self.loss += loss_sum.detach().to(self.loss.dtype)
        self.top1 += topk_hits(logits, labels, 1)
        self.top5 += topk_hits(logits, labels, 5)

    def watch(self, loss: torch.Tensor, batch: int) -> None:
        """Remember `batch` if its loss is the first that is not finite."""
        first = (self.bad_batch < 0) & ~torch.isfinite(loss.detach())
        self.bad_batch = torch.where(first, batch, self.bad_batch)
        self.bad_loss = torch.where(first, loss.detach().float(), self.bad_loss)

    def check_finite(self, epoch: int) -> None:
        """Raise FloatingPointError naming the first batch whose loss was not finite (one read)."""
        bad = int(self.bad_batch)
        if bad >= 0:
            raise FloatingPointError(
                f"training loss became {float(self.bad_loss)} at epoch {epoch}, batch {bad}; lower train.lr for this model"
            )

    def mean_loss(self) -> float:
        return float(self.loss) / self.total

    def stats(self) -> dict:
        return {"loss": self.mean_loss(), "top1": int(self.top1) / self.total, "top5": int(self.top5) / self.total}


def batches_of(dataset: ImageDataset, order: torch.Tensor, batch_size: int, num_workers: int):
    """Yield (uint8 images, labels) batches in ``order``; workers decode in parallel when asked."""
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if num_workers == 0:
        for idx in chunks:
            yield dataset.raw_batch(idx), dataset.labels[idx]
        return
    loader = torch.utils.data.DataLoader(
        chunks,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=lambda idx: (dataset.raw_batch(idx), dataset.labels[idx]),
        persistent_workers=False,
    )
    yield from loader


def evaluate(model, dataset: ImageDataset, device, batch_size: int, amp: bool, num_workers: int = 0) -> dict:
    """Mean loss, top-1 and top-5 accuracy (fractions) over a whole split."""
    model.eval()
    tally = _Tally(device)
    order = torch.arange(len(dataset))
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        for raw, labels in batches_of(dataset, order, batch_size, num_workers):
            x = dataset.normalise(raw).to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            logits = model(x).float()
            tally.add(F.cross_entropy(logits, labels, reduction="sum"), logits, labels)
    return tally.stats()


def make_optimizer(model, train_cfg: dict, fused: bool | None = None) -> torch.optim.Optimizer:
    """`train.optimizer`: sgd (the paper's: momentum `train.momentum`, L2 `train.weight_decay`) or
    adamw (Adam with decoupled weight decay `train.weight_decay`; `momentum` unused). AdamW is what
    takes ResNet-50 from chance to well above it in the few hundred steps a CPU run has (README).

    fused: one fused kernel per step (None: when the parameters are on a GPU). With mixed
    precision, GradScaler checks a plain optimizer's gradients for inf/NaN by reading a GPU value
    before every step; a fused one skips the step on the device instead, so the host never waits.
    On the CPU the default stays torch's usual implementation (the trained weights as before)."""
    kind = train_cfg.get("optimizer", "sgd")
    if fused is None:
        fused = next(model.parameters()).device.type == "cuda"
    extra = {"fused": True} if fused else {}
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=train_cfg["lr"], momentum=train_cfg["momentum"],
                               weight_decay=train_cfg["weight_decay"], **extra)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"], **extra)
    raise ValueError(f"config key 'train.optimizer': unknown optimizer {kind!r}; use sgd or adamw")


def train_model(
    model_name: str,
    data_dir: str | Path,
    outputs: TrainOutputs,
    *,
    arch_cfg: dict,
    train_cfg: dict,
    seed: int,
    device: str = "auto",
    log=print,
    stop_after_epoch: int | None = None,
) -> pd.DataFrame:
    """Train ``model_name`` on the dataset at ``data_dir``; write checkpoints and history.

    train_cfg: convviz.config.train_settings() (epochs, lr, schedule, batch_size, ...).
    Returns the history table: one row per (epoch, split) with loss, top1, top5 (fractions),
    lr, seconds, and resumed_from_epoch: 0 where the process that trained the epoch started from
    scratch, k where it resumed after epoch k (a killed or preempted job that was rerun).
    ``stop_after_epoch`` ends the run early (simulates a preempted job in tests).
    """
    t_start = time.time()
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    amp = bool(train_cfg["amp"]) and cuda
    train_ds = ImageDataset(data_dir, "train", train_cfg.get("image_size") or _image_size(data_dir))
    val_ds = ImageDataset(data_dir, "val", train_ds.image_size)
    if train_ds.meta.get("multilabel"):
        log("dataset is multi-label: training on each image's primary label (its largest object)")
    epochs = int(train_cfg["epochs"])
    run_id = fingerprint(model_name, arch_cfg, train_cfg, seed, train_ds.meta, len(train_ds))

    torch.manual_seed(seed)
    model = build_model(model_name, train_ds.num_classes, train_ds.image_size, arch_cfg).to(dev)
    if cuda and train_cfg.get("channels_last", True):
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, train_cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    renormalize = getattr(model, "renormalize_filters", None)
    history: list[dict] = []
    start_epoch = 1
    resumed_from = 0

    state = _load_resume(outputs.resume, run_id, log)
    if state is not None and not _epochs_kept(outputs, train_cfg, min(int(state["epoch"]), epochs)):
        # A state whose earlier epoch checkpoints are gone (versions before they waited beside
        # it wrote them to the output directory, which Snakemake deletes before a rerun; and a
        # finished run's state is one of those): resuming would never publish them. Train again.
        log(f"ignoring resume state {outputs.resume}: the epoch checkpoints of the epochs it covers are gone; "
            "starting from scratch")
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        # Earlier rows keep their own resumed_from_epoch (0 in states written before the column).
        history = [{"resumed_from_epoch": 0, **dict(zip(state["history_columns"], row))}
                   for row in state["history_rows"]]
        resumed_from = int(state["epoch"])
        start_epoch = resumed_from + 1
        log(f"resuming {model_name} from epoch {state['epoch']} of {epochs} ({outputs.resume})")
    else:
        _drop_kept_epochs(outputs)  # from another run: this one starts afresh
        log(f"training {model_name} from scratch: {epochs} epochs, {len(train_ds)} train / {len(val_ds)} val images, "
            f"{train_ds.num_classes} classes, {sum(p.numel() for p in model.parameters()):,} parameters, device {dev}")
        if not arch_cfg.get("weights"):
            center_init(model, train_ds, int(train_cfg.get("center_init", 0)), seed, dev, log)

    outputs.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    ckpt_epochs = set(train_cfg["checkpoint_epochs"])
    if start_epoch == 1 and 0 in ckpt_epochs:
        _save_epoch(outputs, model_name, model, 0, train_ds, arch_cfg)
    batch_size = int(train_cfg["batch_size"])
    for epoch in range(start_epoch, epochs + 1):
        lr = train_cfg["lr"] * lr_factor(train_cfg["schedule"], epoch - 1, epochs, train_cfg["step_size"], train_cfg["gamma"])
        t0 = time.time()
        train_stats = _train_one_epoch(
            model, train_ds, optimizer, scaler, dev, seed, epoch, batch_size, train_cfg, amp, renormalize, log, lr
        )
        seconds = time.time() - t0
        val_stats = evaluate(model, val_ds, dev, batch_size, amp, int(train_cfg["num_workers"]))
        history.append({"epoch": epoch, "split": "train", **train_stats, "lr": lr, "seconds": seconds,
                        "resumed_from_epoch": resumed_from})
        history.append({"epoch": epoch, "split": "val", **val_stats, "lr": lr, "seconds": time.time() - t0 - seconds,
                        "resumed_from_epoch": resumed_from})
        log(f"epoch {epoch}/{epochs}: train loss {train_stats['loss']:.3f} top1 {train_stats['top1']:.3f} | "
            f"val loss {val_stats['loss']:.3f} top1 {val_stats['top1']:.3f} top5 {val_stats['top5']:.3f} | "
            f"lr {lr:.4g} | {seconds:.1f}s ({len(train_ds) / seconds:.0f} img/s)")
        if epoch in ckpt_epochs:
            _save_epoch(outputs, model_name, model, epoch, train_ds, arch_cfg)
        _save_resume(outputs.resume, run_id, epoch, model, optimizer, scaler, history)
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            log(f"stopping after epoch {epoch} as asked")
            return pd.DataFrame(history)

    table = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    save_checkpoint(
        outputs.final, model_name, model.to("cpu"), epoch=epochs, num_classes=train_ds.num_classes,
        input_size=train_ds.image_size, arch_cfg=arch_cfg,
        extra={"classes": list(train_ds.meta["classes"]), "mean": train_ds.meta["mean"], "std": train_ds.meta["std"]},
    )
    write_parquet(table, outputs.history)
    _publish_epochs(outputs)
    if outputs.curves is not None:
        from convviz.plots import plot_training_curves

        plot_training_curves(table, model_name, outputs.curves)
    _forget_resume(outputs)  # last: a failure before here reruns as a resume, not from scratch
    final_val = table[table["split"] == "val"].tail(1)
    summary = f"val top1 {float(final_val['top1'].iloc[0]):.3f}" if len(final_val) else "no epochs run"
    log(f"done: {model_name} {epochs} epochs, {summary}, chance {1 / train_ds.num_classes:.3f}, "
        f"{time.time() - t_start:.0f}s in total")
    return table


def center_init(model, dataset, images: int, seed: int, dev, log) -> None:
    """`train.center_init`: centre the hidden layers' biases on `images` seeded training images
    (convviz.models.data_init; nothing changes for layers without biases, e.g. resnet50's convs).
    dataset: an ImageDataset or anything with len, raw_batch and normalise. images 0: off."""
    if images <= 0:
        return
    if not centred_layers(model):
        log("center_init: no hidden layer has a bias to centre (BatchNorm centres them); nothing changed")
        return
    count = min(images, len(dataset))
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    x = dataset.normalise(dataset.raw_batch(pick)).to(dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    changed = center_biases(model, x)
    log(f"centred the biases of {len(changed)} layer(s) on {count} training images: {', '.join(changed)}")


def _image_size(data_dir) -> int:
    return int(json.loads((Path(data_dir) / "dataset.json").read_text())["image_size"])


def _train_one_epoch(model, dataset, optimizer, scaler, dev, seed, epoch, batch_size, cfg, amp, renormalize, log, lr) -> dict:
    """One pass over the training split at learning rate ``lr``; randomness depends only on (seed, epoch).

    During the first ``warmup_epochs`` the rate ramps up linearly per step (Goyal et al. 2017): nets
    without BatchNorm (alexnet, zfnet) otherwise die at chance level in their first steps.
    """
    model.train()
    torch.manual_seed(epoch_seed(seed, epoch))  # dropout of this epoch
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch) + 1)
    order = torch.randperm(len(dataset), generator=gen)
    flips = torch.rand(len(dataset), generator=gen) < 0.5 if cfg["augment"] else None
    n_batches = math.ceil(len(dataset) / batch_size)
    report_every = max(1, n_batches // 4)
    tally = _Tally(dev)
    channels_last = dev.type == "cuda" and cfg.get("channels_last", True)
    warmup_steps = int(cfg.get("warmup_epochs", 0) * n_batches)
    t0 = time.time()
    for b, (raw, labels) in enumerate(batches_of(dataset, order, batch_size, int(cfg["num_workers"]))):
        step = (epoch - 1) * n_batches + b
        for group in optimizer.param_groups:
            group["lr"] = lr * (step + 1) / warmup_steps if step < warmup_steps else lr
        if len(labels) < 2 and tally.total > 0:
            continue  # a 1-image tail batch breaks BatchNorm; its images are seen next epoch
        x = dataset.normalise(raw)
        if flips is not None:
            f = flips[order[b * batch_size : b * batch_size + len(labels)]]
            x[f] = x[f].flip(-1)
        x = x.to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = labels.to(dev, non_blocking=True)
        with torch.autocast(dev.type, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.get("grad_clip"):
            # Caps rare huge steps that kill ReLUs in nets without BatchNorm (alexnet, zfnet).
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        if renormalize is not None:
            renormalize()  # paper Sec. 3: cap each conv filter's RMS after every update
        tally.watch(loss, b)
        tally.add(loss.detach().to(tally.loss.dtype) * len(labels), logits.detach().float(), labels)
        if (b + 1) % report_every == 0 and b + 1 < n_batches:
            # The only reads of GPU values in an epoch: here and at its end.
            tally.check_finite(epoch)
            log(f"  epoch {epoch} batch {b + 1}/{n_batches}: loss {tally.mean_loss():.3f} "
                f"({tally.total / (time.time() - t0):.0f} img/s)")
    tally.check_finite(epoch)
    return tally.stats()


def _save_epoch(outputs, model_name, model, epoch, dataset, arch_cfg) -> None:
    """An epoch checkpoint, kept beside the resume state until the run completes: Snakemake
    deletes the checkpoint directory (an output) before rerunning a killed job, and the resumed
    run must still publish the epochs trained before the kill (`_publish_epochs`)."""
    path = outputs.resume.parent / f"epoch_{epoch:03d}.pt"
    save_checkpoint(path, model_name, model, epoch=epoch, num_classes=dataset.num_classes,
                    input_size=dataset.image_size, arch_cfg=arch_cfg)


def _publish_epochs(outputs) -> None:
    """At the end of a run: the kept epoch checkpoints into the checkpoint directory (hard links
    where the file system allows, else copies); they stay kept until `_forget_resume`."""
    outputs.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(outputs.resume.parent.glob("epoch_*.pt")):
        target = outputs.checkpoint_dir / path.name
        target.unlink(missing_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def _forget_resume(outputs) -> None:
    """After a completed run: the resume state and the kept epoch checkpoints are removed, so a
    later rerun (a changed config or code) trains from scratch instead of resuming a finished
    run. A kill before this leaves everything to resume and publish again."""
    outputs.resume.unlink(missing_ok=True)
    _drop_kept_epochs(outputs)


def _epochs_kept(outputs, train_cfg: dict, upto: int) -> bool:
    """Whether every checkpoint epoch up to `upto` waits beside the resume state."""
    wanted = [e for e in train_cfg["checkpoint_epochs"] if e <= upto]
    return all((outputs.resume.parent / f"epoch_{e:03d}.pt").exists() for e in wanted)


def _drop_kept_epochs(outputs) -> None:
    """Remove epoch checkpoints kept by an earlier, different run (see `_save_epoch`)."""
    for path in outputs.resume.parent.glob("epoch_*.pt"):
        path.unlink()


def _save_resume(path: Path, run_id: str, epoch: int, model, optimizer, scaler, history: list[dict]) -> None:
    """Everything needed to continue after ``epoch``: weights, optimiser momentum, history."""
    columns = list(history[0].keys()) if history else []
    save_torch(
        {
            "format": RESUME_FORMAT,
            "run_id": run_id,
            "epoch": epoch,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "history_columns": columns,
            "history_rows": [[row[c] for c in columns] for row in history],
        },
        path,
    )


def _load_resume(path: Path, run_id: str, log) -> dict | None:
    """The resume state if it belongs to this run; a stale or corrupt one is ignored with a log line."""
    if not path.exists():
        return None
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        log(f"ignoring resume state: {err}")
        return None
    if state.get("format") != RESUME_FORMAT or state.get("run_id") != run_id:
        log(f"ignoring resume state {path}: it belongs to a different configuration; starting from scratch")
        return None
    return state
