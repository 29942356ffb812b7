"""Training states (RUN/state/step-XXXXXXXX/; docs/training.md, "The run folder"): every rank
writes its own shards as safetensors (torch.distributed.checkpoint's Hugging Face writer) and
rank 0 adds one JSON index, state.json, holding everything that is not a tensor. A state is
written into a temporary folder renamed into place once complete, so it is whole or absent;
it loads on any number of processes, each reading only the slices of its own shards. Nothing
is unpickled (states of the single-file format before 2026-12-07 load with weights_only)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from greedygrow.atomic import TMP_PREFIX, atomic_write_json, fsync_dir
from greedygrow.checkpoint import CheckpointMismatch, nonfinite_tensors, refuse_nonfinite
from greedygrow.distributed import distributed, main_process

log = logging.getLogger(__name__)

STATE_DIR = "state"
INDEX = "state.json"  # the index: the non-tensor values and the shard files with their sizes
FORMAT = "greedygrow-state"
FORMAT_VERSION = 2  # 1: one torch.save file per state, written by rank 0
_STATE_RE = re.compile(r"^step-(\d+)(\.pt)?$")
# a rank's shards go into files of at most this much (and one part per file): a save holds one
# file's tensors twice (a contiguous CPU copy, then its serialised bytes), never all of them
FILE_BYTES = 2**30


class UnreadableState(ValueError):
    """A state folder that is incomplete or damaged (a shard file missing or truncated)."""


def state_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``RUN/state/step-XXXXXXXX`` (a folder) for ``step``."""
    return Path(run_dir) / STATE_DIR / f"step-{step:08d}"


def list_states(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The saved training states of a run as (step, path), oldest first: folders holding an
    index, and single files of format 1."""
    directory = Path(run_dir) / STATE_DIR
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STATE_RE.match(p.name)
        if m and (p.is_file() if m.group(2) else (p / INDEX).is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def _split(state: Mapping, where: str = "") -> tuple[dict[str, Tensor], dict]:
    """(tensors by "a/b/c" key path, the rest as nested dicts): a state's two files."""
    tensors, rest = {}, {}
    for k, v in state.items():
        if not isinstance(k, str) or "/" in k:
            raise TypeError(f"state key {where}/{k!r}: use str keys without '/'")
        path = f"{where}/{k}".lstrip("/")
        if isinstance(v, Tensor):
            tensors[path] = v
        elif isinstance(v, Mapping):
            inner, inner_rest = _split(v, path)
            tensors |= inner
            if inner_rest or not inner:
                rest[k] = inner_rest
        else:
            rest[k] = v
    return tensors, rest


def _join(tensors: Mapping[str, Tensor], rest: dict) -> dict:
    """The nested state of `_split`'s two parts."""
    state = json.loads(json.dumps(rest))  # a deep copy
    for path, t in tensors.items():
        *parents, leaf = path.split("/")
        node = state
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = t
    return state


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns at every save and load in one process that it assumes one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if distributed():
        dist.barrier()


def save_state(run_dir: str | os.PathLike, step: int, state: dict, keep: int = 3) -> Path:
    """Save a training state as ``RUN/state/step-XXXXXXXX/`` and keep the last ``keep``.
    ``state`` is nested dicts whose leaves are tensors (this rank's shards under FSDP2: DTensors)
    or JSON values. Under torch.distributed every rank calls it (a collective): each writes its
    own shards, replicated tensors once. Refused, on every rank, if any tensor holds NaN/inf."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"save_state: step must be an int >= 0, got {step!r}")
    tensors, rest = _split(state)
    path = state_path(run_dir, step)
    try:  # non-JSON values are refused before any work
        json.dumps(rest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{path} not written: {e}; a state holds tensors, and numbers, strings, lists and "
            "dicts (e.g. torch.as_tensor(x) for a numpy array, cfg.to_dict() for a config)"
        ) from e
    bad = nonfinite_tensors({k: _local(t) for k, t in tensors.items()})
    if distributed():  # every rank refuses, or none does
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, bad)
        bad = sorted({name for names in gathered for name in names})
    refuse_nonfinite(bad, path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    if main_process():  # folders left by a save that was killed go first
        for stale in path.parent.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if tensors:
        files = _file_plan(tensors, dist.get_world_size() if distributed() else 1)
        writer = HuggingFaceStorageWriter(str(tmp), files, save_distributed=True)
        with _quiet_single_process():
            dcp.save(tensors, storage_writer=writer, no_dist=not distributed())
    if main_process():
        files = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.safetensors"))}
        index = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files, **rest}
        atomic_write_json(tmp / INDEX, index)
        _replace_dir(tmp, path)
        for _, old in list_states(run_dir)[:-keep]:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    _barrier()
    return path


def _file_plan(tensors: Mapping[str, Tensor], world: int) -> dict[str, int]:
    """Which file (1, 2, ...) of each rank holds each tensor: files of one part each (the
    model, each AdamW moment, the EMA, ...) of at most FILE_BYTES; from global sizes, so that
    every rank agrees."""
    parts: dict[str, list[str]] = {}
    for key in tensors:  # "optimizer/state/<name>/exp_avg" is part "optimizer/exp_avg"
        first, last = key.split("/")[0], key.split("/")[-1]
        parts.setdefault(f"{first}/{last}" if first == "optimizer" else first, []).append(key)
    plan, index = {}, 0
    for keys in parts.values():
        size = FILE_BYTES  # a new file for each part
        for key in keys:
            t = tensors[key]
            nbytes = t.numel() * t.element_size() // (world if hasattr(t, "device_mesh") else 1)
            if size + nbytes > FILE_BYTES and size > 0:
                index, size = index + 1, 0
            plan[key] = index
            size += nbytes
    return plan


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename the complete folder `tmp` to `path` (replacing a state of the same step)."""
    old = path.with_name(f"{TMP_PREFIX}old-{path.name}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _index(path: Path) -> dict:
    """A state folder's index, after checking that every shard file it lists is there whole."""
    try:
        index = json.loads((path / INDEX).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UnreadableState(f"{path / INDEX} is unreadable ({e})") from e
    if index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise UnreadableState(
            f"{path / INDEX} is not a greedygrow state of format {FORMAT_VERSION}"
        )
    for name, size in index["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            found = file.stat().st_size if file.is_file() else "missing"
            raise UnreadableState(f"{file}: {size} bytes expected, found {found}")
    return index


def latest_state(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest complete training state as (step, path), or None if the run has none; a
    damaged one (a shard file missing or truncated) is skipped with a warning naming it."""
    for step, path in reversed(list_states(run_dir)):
        if path.is_file():  # format 1: read whole when loaded
            return step, path
        try:
            _index(path)
        except UnreadableState as e:
            log.warning(
                "training state %s is unreadable (%s); falling back to the one before", path, e
            )
            continue
        return step, path
    return None


def load_state(path: str | os.PathLike, like: dict | None = None) -> dict:
    """The training state at `path` as nested dicts. With `like` (the nested state this rank
    would save: its shards under FSDP2), its tensors are filled in place, each rank reading
    only its slices of the saved shards, whatever number of processes wrote them (a collective
    under torch.distributed); without, full CPU tensors are read in this process."""
    path = Path(path)
    if path.is_file():
        return _load_format_1(path, like)
    index = _index(path)
    rest = {k: v for k, v in index.items() if k not in ("format", "format_version", "files")}
    reader = HuggingFaceStorageReader(str(path))
    saved = reader.read_metadata().state_dict_metadata
    if like is None:
        targets = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in saved.items()}
        no_dist = True
    else:
        targets, _ = _split(like)
        _check_fits(path, {k: tuple(m.size) for k, m in saved.items()}, targets)
        no_dist = not distributed()
    if targets:
        with _quiet_single_process():
            dcp.load(targets, storage_reader=reader, no_dist=no_dist)
    return _join(targets, rest)


def _check_fits(path: Path, saved: dict[str, tuple[int, ...]], targets: dict[str, Tensor]) -> None:
    """Refuse a state whose tensors do not match this run's, naming every difference."""
    missing = [k for k in targets if k not in saved]
    unexpected = [k for k in saved if k not in targets]
    mismatched = [
        (k, saved[k], tuple(t.shape))
        for k, t in targets.items()
        if k in saved and saved[k] != tuple(t.shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [
        f"training state {path} does not fit this run: {len(missing)} missing, "
        f"{len(unexpected)} unexpected, {len(mismatched)} shape-mismatched tensors",
        *(f"  missing:    {k}" for k in missing),
        *(f"  unexpected: {k}" for k in unexpected),
        *(f"  shape:      {k} state {list(a)} vs run {list(b)}" for k, a, b in mismatched),
        "It was written by another configuration: resume with the run's own config.yaml, or "
        "start a new --out folder.",
    ]
    raise CheckpointMismatch("\n".join(lines), missing, unexpected, mismatched)


def _load_format_1(path: Path, like: dict | None) -> dict:
    """A single-file state (format 1), read whole by every rank; with `like`, its tensors are
    filled with their slices of it."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if like is None:
        return state
    saved, rest = _split(state)
    targets, _ = _split(like)
    _check_fits(path, {k: tuple(t.shape) for k, t in saved.items()}, targets)
    with torch.no_grad():
        for k, t in targets.items():
            source = saved[k]
            if hasattr(t, "device_mesh"):  # a DTensor: this rank's slice of the full tensor
                from torch.distributed.tensor import distribute_tensor

                source = distribute_tensor(source, t.device_mesh, t.placements, src_data_rank=None)
            _local(t).copy_(_local(source))
    return _join(targets, rest)
