"""The command-line tools, run as a user runs them (subprocesses): a mistake in the input prints one
message naming what is wrong and exits non-zero without a traceback; --debug or FASTMASKFORMER_DEBUG=1
shows the traceback."""
import os
import subprocess
import sys

import pytest
import torch

from fastmaskformer.config import REPO_ROOT, load_config
from fastmaskformer.engine.build import build_model

DEBUG = os.path.join(REPO_ROOT, "configs", "debug.yaml")
# A tiny model on 32px synthetic images: building it takes a fraction of a second.
TINY = ["model.num_queries=4", "model.hidden_dim=32", "model.mask_dim=32", "model.conv_dim=64", "model.nheads=2",
        "model.dim_feedforward=32", "model.dec_layers=1", "data.image_size=32", "data.val_length=1",
        "train.device=cpu"]


def _run(tmp_path, module, *args, debug_env=None):
    env = {k: v for k, v in os.environ.items() if k != "FASTMASKFORMER_DEBUG"}
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if debug_env is not None:
        env["FASTMASKFORMER_DEBUG"] = debug_env
    return subprocess.run([sys.executable, "-m", f"fastmaskformer.{module}", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def _clean_error(out, code, *words):
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for w in words:
        assert w in out.stderr, (w, out.stderr)


@pytest.mark.parametrize("args, words", [
    (["solver.nope=1"], ["error: solver.nope: unknown key (fields of solver:"]),
    (["solver.max_iter=many"], ["error: solver.max_iter: expected int, got 'many' (str)"]),
    (["--config", "missing.yaml"], ["error: [Errno 2] No such file or directory: 'missing.yaml'"]),
])
def test_train_config_errors(tmp_path, args, words):
    _clean_error(_run(tmp_path, "train", *args), 2, *words)


def _ade_layout_args(tmp_path):
    return ["--config", DEBUG, "data.name=ade20k", f"data.root={tmp_path / 'nowhere'}", "data.num_classes=150",
            f"train.output_dir={tmp_path / 'out'}"]


def test_train_wrong_dataset_layout(tmp_path):
    out = _run(tmp_path, "train", *_ade_layout_args(tmp_path))
    _clean_error(out, 1, f"python -m fastmaskformer.train: error: ADE20K: {tmp_path / 'nowhere'} does not exist. "
                         "Expected this layout", "annotations/training", "--debug")


@pytest.mark.parametrize("how", ["--debug", "FASTMASKFORMER_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, how):
    flag = [how] if how == "--debug" else []
    out = _run(tmp_path, "train", *flag, *_ade_layout_args(tmp_path), debug_env="1" if not flag else None)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr and "MissingDataError: ADE20K:" in out.stderr


def test_resume_without_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "out"
    run.mkdir()
    (run / "checkpoint_0000004.pth").write_bytes(b"garbage" * 100)
    out = _run(tmp_path, "train", "--config", DEBUG, "--resume", f"train.output_dir={run}")
    _clean_error(out, 1, f"error: resume: no checkpoint in {run} could be loaded; tried, newest first:",
                 f"{run / 'checkpoint_0000004.pth'}: cannot load it")


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": build_model(load_config(None, TINY)).state_dict()}, path)
    return path


def test_evaluate_unreadable_checkpoint(tmp_path, weights):
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    out = _run(tmp_path, "evaluate", "--checkpoint", str(weights), *TINY)
    _clean_error(out, 1, f"python -m fastmaskformer.evaluate: error: {weights}: cannot load it (")


def test_evaluate_checkpoint_of_another_model(tmp_path, weights):
    out = _run(tmp_path, "evaluate", "--checkpoint", str(weights), *TINY, "model.num_queries=5")
    _clean_error(out, 1, f"error: {weights}: its weights do not fit the model of this config", "query_embed")


def test_evaluate_missing_checkpoint_and_bad_key(tmp_path):
    _clean_error(_run(tmp_path, "evaluate", "--checkpoint", "nope.pth"), 2,
                 "error: --checkpoint: nope.pth does not exist")
    _clean_error(_run(tmp_path, "evaluate", "--checkpoint", "nope.pth", "data.bogus=1"), 2,
                 "error: data.bogus: unknown key")


def test_evaluate_wrong_dataset_layout(tmp_path, weights):
    out = _run(tmp_path, "evaluate", "--checkpoint", str(weights), *TINY, "data.name=cityscapes",
               f"data.root={tmp_path}", "data.num_classes=19")
    _clean_error(out, 1, f"error: Cityscapes: {tmp_path / 'leftImg8bit' / 'val'} does not exist")
