"""Checkpoints that survive a crash mid-write, and the RNG states that make a resume exact.

A checkpoint is written to a temporary file in the destination directory, flushed and fsynced,
then renamed over the final name with ``os.replace`` (atomic on POSIX) and the directory entry
fsynced: a reader sees either the previous complete file or the new complete file, never a torn
one. Periodic checkpoints are ``checkpoint_<iteration:07d>.pth``; the newest ``keep_last`` stay.

Files can still break outside our control (a copy that stopped half way, a full disk on another
tool's write, a file that is not a checkpoint at all): ``load`` turns every such failure into a
:class:`CheckpointError` naming the file, and ``load_newest`` falls back to older checkpoints.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import UserError

TRAINING_KEYS = ("model", "optimizer", "scheduler", "scaler", "iteration", "rng", "data_position")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read, or that does not hold what it should."""


_NAME = re.compile(r"^checkpoint_(\d+)\.pth$")
_TMP_PREFIX = ".tmp_"


def checkpoint_path(output_dir: str, iteration: int) -> str:
    return os.path.join(output_dir, f"checkpoint_{iteration:07d}.pth")


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """(iteration, path) of the complete periodic checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir) if (m := _NAME.match(n))]
    return sorted(found)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path`` so that a crash at any point leaves the old file intact."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def prune(output_dir: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` periodic checkpoints, and temporary files that a
    killed writer left behind (only the main process writes, so none is in progress)."""
    for _, path in list_checkpoints(output_dir)[:-keep_last]:
        os.unlink(path)
    for name in os.listdir(output_dir):
        if name.startswith(_TMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(output_dir, name))


def load(path: str, required: Tuple[str, ...] = ()) -> Dict:
    """The dict saved in ``path``; CheckpointError (naming the file and the cause) when it cannot be
    read or lacks one of the ``required`` keys."""
    try:
        # weights_only: a checkpoint holds tensors and plain Python values only (see rng_state).
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn zip, garbage bytes, unpickling refusal, missing file: all "cannot load"
        raise CheckpointError(f"{path}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got a {type(state).__name__}")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path}: expected a checkpoint with {list(required)}, it lacks {missing}")
    return state


def load_model_state(model: torch.nn.Module, state: Dict, path: str) -> None:
    """``model.load_state_dict(state)``; CheckpointError naming ``path`` when the weights do not fit
    the model (another config, another architecture)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path}: its weights do not fit the model of this config "
                              f"({detail[:500]}{'...' if len(detail) > 500 else ''})") from e


def load_newest(output_dir: str) -> Optional[Tuple[str, Dict]]:
    """(path, state) of the newest periodic checkpoint in ``output_dir`` that loads as a training
    checkpoint, warning about each newer one that does not; None when there is no checkpoint, and
    CheckpointError listing every file tried and its error when none loads."""
    failures = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            return path, load(path, TRAINING_KEYS)
        except CheckpointError as e:
            failures.append(str(e))
            warnings.warn(f"resume: skipping {e}; trying an older checkpoint", RuntimeWarning, stacklevel=2)
    if failures:
        raise CheckpointError(f"resume: no checkpoint in {output_dir} could be loaded; tried, newest first:\n  "
                              + "\n  ".join(failures))
    return None


def rng_state() -> Dict:
    """Every random generator the training step can touch, in types that ``weights_only`` loads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(s):
    # random.setstate needs tuples; a round trip through torch.save may return lists.
    version, internal, gauss = s
    return version, tuple(internal), gauss


@contextlib.contextmanager
def preserved_rng():
    """Run a block (evaluation, visualization) without moving any training random stream."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)
