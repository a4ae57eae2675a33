"""Checkpoints: save atomically, load safely (tensors and plain data only), rebuild models from them.

A convviz checkpoint is a dict
    {"format": "convviz-checkpoint-v1", "model": <registry name>, "epoch": int,
     "num_classes": int, "input_size": int, "arch_cfg": dict, "state_dict": {...}, **extra}
written with `convviz.io.save_torch` (temp file + rename, so a killed job leaves no half file) and
read with `torch.load(..., weights_only=True)` always: unpickling can run arbitrary code, and a
checkpoint is data, so anything beyond tensors and plain containers is refused.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from convviz.io import save_torch

log = logging.getLogger(__name__)

FORMAT = "convviz-checkpoint-v1"
_META_KEYS = ("format", "model", "epoch", "num_classes", "input_size", "arch_cfg", "state_dict")
# How many mismatching keys an error message lists before "...".
_MAX_KEYS_SHOWN = 5
_PLAIN_SCALARS = (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe, or does not fit the requested model."""


# --------------------------------------------------------------------------------------------- save


def _plain(value) -> object:
    """`value` with path-likes turned into str; TypeError if a weights-only load could not read it."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, _PLAIN_SCALARS):
        return value
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"cannot store a {type(value).__name__} in a checkpoint: load_checkpoint only accepts "
        "tensors and plain data (None, bool, int, float, str, list, tuple, dict)"
    )


def save_checkpoint(
    path: str | os.PathLike,
    model_name: str,
    model: nn.Module,
    *,
    epoch: int,
    num_classes: int,
    input_size: int,
    arch_cfg: Mapping | None,
    extra: Mapping | None = None,
) -> None:
    """Write `model`'s weights plus the metadata `load_model` needs to rebuild it, atomically.

    `extra` (e.g. optimiser state, metrics) is merged into the top level; it must not reuse a
    metadata key and must be plain data, checked here so that a bad value fails at save time
    rather than when the checkpoint is loaded later.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_META_KEYS))
    if clash:
        raise ValueError(f"extra keys {clash} clash with checkpoint metadata keys {list(_META_KEYS)}")
    checkpoint = {
        "format": FORMAT,
        "model": model_name,
        "epoch": int(epoch),
        "num_classes": int(num_classes),
        "input_size": int(input_size),
        "arch_cfg": _plain(dict(arch_cfg or {})),
        "state_dict": model.state_dict(),
        **_plain(extra),
    }
    save_torch(checkpoint, path)


# --------------------------------------------------------------------------------------------- load


def _refusal_reason(err: Exception) -> str | None:
    """torch's reason when its weights-only unpickler refused the file's content, else None.

    The refusal names what it met (e.g. "unsupported GLOBAL posix.system ... is blocked", or
    "Unsupported operand 149" for a plain-pickle file); that is the last line before torch's
    pointer to its documentation.
    """
    message = str(err)
    if not isinstance(err, pickle.UnpicklingError) or "Weights only load failed" not in message:
        return None
    lines = [line.strip() for line in message.split("Check the documentation")[0].splitlines() if line.strip()]
    return lines[-1] if len(lines) > 1 else "see torch.load's weights_only documentation"


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file onto the CPU, accepting only tensors and plain data.

    Raises CheckpointError (with the path) when the file is missing, truncated or corrupt, or
    holds pickled Python objects (which could run code on load).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    archive = zipfile.is_zipfile(path)
    if archive:
        _check_archive(path)
    try:
        # weights_only=True always: never execute code from a checkpoint.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch surfaces damage as RuntimeError, EOFError, OSError, KeyError, ...
        reason = _refusal_reason(err)
        if reason is not None and not archive:
            raise CheckpointError(
                f"refused to load {path}: it is not a torch.save archive (random or damaged bytes, "
                "not a checkpoint at all, or a plain pickle holding Python objects beyond tensors "
                f"and plain data; torch: {reason}); if it is a damaged checkpoint, delete it and "
                "rerun training; only load checkpoints you trust"
            ) from err
        if reason is not None:
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects beyond tensors and plain data "
                f"(or is not a torch.save file); only load checkpoints you trust (torch: {reason})"
            ) from err
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {str(err)[:200]}); "
            "delete it and rerun training"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def _check_archive(path: Path) -> None:
    """CheckpointError if an entry of the torch.save zip archive fails its CRC-32 check: torch
    itself reads flipped bytes in a tensor's data without complaint, as wrong weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # truncated, unreadable
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}: {str(err)[:200]}); "
            "delete it and rerun training"
        ) from err
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its entry {bad!r} fails its CRC-32 check (damaged on "
            "disk or in a copy); delete it and rerun training"
        )


def is_convviz_checkpoint(obj: Mapping) -> bool:
    """True for a dict written by `save_checkpoint` (as opposed to a bare state dict)."""
    return obj.get("format") == FORMAT


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _head_name(model: nn.Module) -> str:
    """Dotted path of the model's last nn.Linear (the classifier head replaced on a class change)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return linears[-1]


def _shown(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else ""
    return ", ".join(keys[:_MAX_KEYS_SHOWN]) + more


def _mismatches(model: nn.Module, state_dict: Mapping) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key: file shape vs model shape' lines) against `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} in file vs {tuple(own[k].shape)} in model"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, shapes


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping,
    *,
    path: str | os.PathLike,
    expected_model: str,
    file_model: str | None = None,
    allow_new_head: bool = False,
) -> bool:
    """Load `state_dict` into `model`, strictly, with errors that say what went wrong.

    With `allow_new_head`, a classifier head whose shape differs (another number of classes) is
    skipped and the model keeps its freshly initialised head; every other tensor must match
    exactly. Returns True when the head was kept fresh.
    """
    if file_model is not None and file_model != expected_model:
        raise CheckpointError(f"checkpoint {path} holds a {file_model} model, not {expected_model}")
    if not _is_state_dict(state_dict):
        raise CheckpointError(f"checkpoint {path}: its state_dict is not a mapping of names to tensors")
    state_dict = dict(state_dict)
    fresh_head = False
    if allow_new_head:
        head = _head_name(model)
        own = model.state_dict()
        head_keys = [f"{head}.weight", f"{head}.bias"]
        if any(k in state_dict and k in own and state_dict[k].shape != own[k].shape for k in head_keys):
            for k in head_keys:
                state_dict.pop(k, None)
            fresh_head = True
    missing, unexpected, shapes = _mismatches(model, state_dict)
    if fresh_head:
        missing = [k for k in missing if k not in head_keys]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append(f"shape mismatches: {_shown(shapes)}")
        if missing:
            problems.append(f"missing keys: {_shown(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_shown(unexpected)}")
        origin = f"{file_model} weights" if file_model else "weights"
        raise CheckpointError(
            f"checkpoint {path}: its {origin} do not fit the {expected_model} model being built "
            f"(another architecture or arch_cfg?): " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=not fresh_head)
    return fresh_head


def load_weights(model: nn.Module, path: str | os.PathLike, model_name: str) -> nn.Module:
    """Initialise `model` (a fresh `model_name`) from a convviz checkpoint or a bare state dict.

    Used for `arch_cfg["weights"] = <path>`. If the file's head has another number of classes
    (e.g. fine-tuning an ImageNet-trained model on a 10-class set) the fresh head is kept.
    """
    obj = load_checkpoint(path)
    if is_convviz_checkpoint(obj):
        state_dict, file_model = obj["state_dict"], obj.get("model")
    elif _is_state_dict(obj):
        state_dict, file_model = obj, None
    else:
        raise CheckpointError(
            f"checkpoint {path} is neither a convviz checkpoint (format {FORMAT!r}) nor a state dict"
        )
    if load_state_dict_checked(
        model, state_dict, path=path, expected_model=model_name, file_model=file_model, allow_new_head=True
    ):
        log.info("%s: loaded %s except its head (another class count); the head stays fresh", model_name, path)
    else:
        log.info("%s: loaded weights from %s", model_name, path)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a convviz checkpoint describes, load its weights strictly, set eval mode.

    Returns (model, metadata): the checkpoint dict without its "state_dict" (the weights now live
    in the model), i.e. format, model, epoch, num_classes, input_size, arch_cfg and any extras.
    """
    # Imported here: the registry imports this module for weight paths.
    from convviz.models.registry import MODELS, build_model

    checkpoint = load_checkpoint(path)
    if not is_convviz_checkpoint(checkpoint):
        kind = "a bare state dict" if _is_state_dict(checkpoint) else "not a convviz checkpoint"
        raise CheckpointError(
            f"checkpoint {path} is {kind} (no format {FORMAT!r} metadata), so load_model cannot tell "
            "which model to build; build the model yourself and pass the file as arch_cfg weights"
        )
    missing = [k for k in _META_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks metadata keys {missing}")
    name = checkpoint["model"]
    if name not in MODELS:
        raise CheckpointError(f"checkpoint {path} holds a {name!r} model, which is not one of {sorted(MODELS)}")
    # The state dict overrides any pretrained weights, so do not fetch or read them again.
    arch_cfg = {k: v for k, v in dict(checkpoint["arch_cfg"]).items() if k != "weights"}
    try:
        model = build_model(name, checkpoint["num_classes"], checkpoint["input_size"], arch_cfg)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: cannot rebuild its {name} model: {err}") from err
    load_state_dict_checked(model, checkpoint["state_dict"], path=path, expected_model=name, file_model=name)
    metadata = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    return model.to(device).eval(), metadata
