"""What every study rule shares: a trained model loaded for analysis, a split of the dataset,
batches of it, seeded choices, and a batch size that halves itself on CUDA out-of-memory."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from convviz.data.common import ImageDataset
from convviz.machine import full_precision_float32
from convviz.models.checkpoint import load_model
from convviz.train import resolve_device

__all__ = [
    "load_for_analysis",
    "open_split",
    "image_batches",
    "seeded_sample",
    "with_oom_retry",
    "is_out_of_memory",
    "resolve_device",
    "write_npz",
]


def load_for_analysis(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """A trained model in eval mode with frozen parameters (projections and probes never need
    parameter gradients; leaving them on costs memory and time), plus its checkpoint metadata.
    On CUDA, float32 work runs in full float32 from here on (`full_precision_float32`)."""
    full_precision_float32()
    model, meta = load_model(checkpoint, device)
    model.requires_grad_(False)
    return model.eval(), meta


def open_split(data_dir: str | os.PathLike, split: str | None, image_size: int) -> ImageDataset:
    """One split ("train", "val", or None for all) of a dataset directory written by the dataset rule."""
    return ImageDataset(Path(data_dir), split, image_size)


def image_batches(
    dataset: ImageDataset, batch_size: int, indices: Sequence[int] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised images [B, 3, S, S], dataset indices [B] int64), in order, each index once."""
    order = torch.arange(len(dataset)) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield dataset.normalise(dataset.raw_batch(idx)), idx


def seeded_sample(seed: int, population: int, k: int | str, salt: str = "") -> list[int]:
    """k distinct indices from range(population), sorted; the same for the same (seed, salt).
    k="all" (or k >= population) gives every index."""
    if k == "all" or int(k) >= population:
        return list(range(population))
    rng = random.Random(f"{seed}:{salt}")
    return sorted(rng.sample(range(population), int(k)))


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA (or MPS/CPU allocator) out-of-memory errors."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err)


def with_oom_retry(
    work: Callable[[int], object],
    batch_size: int,
    log: Callable[[str], None] = print,
    what: str = "study",
    min_batch_size: int = 1,
):
    """Run ``work(batch_size)``; on out-of-memory, free the cache and retry with half the batch.

    A study whose batch does not fit on the GPU thus slows down instead of failing. ``work``
    must be restartable (it gets the whole job again, with the smaller batch). Below
    ``min_batch_size`` the error is raised, with the batch sizes tried.
    """
    tried = []
    size = int(batch_size)
    while True:
        try:
            return work(size)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not is_out_of_memory(err):
                raise
            tried.append(size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if size // 2 < min_batch_size:
                raise RuntimeError(
                    f"{what}: out of memory even with batch size {size} (tried {tried}); "
                    "free the GPU, use device: cpu, or lower analysis.batch_size"
                ) from err
            size //= 2
            log(f"{what}: out of memory with batch size {tried[-1]}; retrying with {size}")


def write_npz(arrays: dict, path: str | os.PathLike) -> None:
    """numpy .npz (compressed) written atomically: keys are array names."""
    import numpy as np

    from convviz.io import atomic_path

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **{k: np.asarray(v) for k, v in arrays.items()})
