"""Checkpoints as safetensors plus JSON, written atomically; never pickle.

The JSON description travels inside the safetensors header (``metadata["earmark"]``), so one file
replaced with one ``os.replace`` holds both: a crash leaves either the old file or the new one.
A readable ``.json`` copy is written beside it for people; loading never trusts that copy.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

META_KEY = "earmark"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or of the wrong kind."""


class FingerprintError(CheckpointError):
    """A checkpoint of another computation: its fingerprint differs from the one about to be resumed."""


def fingerprint_differences(theirs: dict, ours: dict) -> list[str]:
    """Keys of ``ours`` whose value differs in ``theirs`` (or is missing there), compared as JSON
    (tuples equal lists); extra keys in ``theirs`` count too."""
    ours = json.loads(json.dumps(ours))
    keys = [k for k in ours if k not in theirs or theirs[k] != ours[k]]
    return keys + sorted(k for k in theirs if k not in ours)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete ``.<name>.<pid>.*.tmp`` files beside ``path`` left by writers that no longer run
    (and pre-pid ``.<name>.*.tmp`` files older than an hour)."""
    path = Path(path)
    removed = []
    try:
        siblings = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for p in siblings:
        head = p.name[len(path.name) + 2 :].split(".", 1)[0]
        try:
            if head.isdigit():
                pid = int(head)
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                stale = time.time() - p.stat().st_mtime > 3600
            if stale:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    The temporary file is ``.<name>.<pid>.<random>.tmp``; ones left by a crashed writer (its pid gone)
    are removed by the next write of the same file.
    """
    atomic_write_with(path, lambda fh: fh.write(data))


def atomic_write_with(path: str | Path, write) -> None:
    """``write(fh)`` into a temporary file in the target's folder, fsync, then ``os.replace`` it over the
    target: a crash leaves the old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def tensors_bytes(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """The safetensors bytes of ``tensors`` with the JSON description in the header."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(flat, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_json(path: str | Path, what: str = "JSON") -> object:
    """Parse a JSON file; a missing or corrupt file is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); the file is damaged or was cut short") from None


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict:
    """Parse a YAML file that must hold a mapping; a missing, corrupt or non-mapping file names itself.

    ``what`` names the file in the not-found message, ``expected`` says what the mapping should be.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of {expected}, got {type(loaded).__name__}")
    return loaded


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """Save tensors with a JSON description; returns the sha256 of the file written."""
    data = tensors_bytes(tensors, meta)
    atomic_write_bytes(path, data)
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return hashlib.sha256(data).hexdigest()


def tensors_from_bytes(data: bytes, where: str, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and their JSON description from safetensors bytes; ``where`` names the source in errors."""
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {})[META_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: not an earmark checkpoint ({exc})") from exc
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{where}: holds a {meta.get('kind')!r}, expected a {kind!r}")
    return tensors, meta


def load_tensors(path: str | Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Load tensors, their JSON description and the file's sha256; checks ``meta['kind']``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    tensors, meta = tensors_from_bytes(data, str(path), kind)
    return tensors, meta, hashlib.sha256(data).hexdigest()


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state dict into safetensors-able tensors and JSON-able everything else."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}
