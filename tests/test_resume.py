"""--resume when the newest checkpoint is broken: it warns naming the file and the error, resumes
from the newest one that loads, and stops with every file it tried when none loads."""
import os
import shutil

import pytest
import torch

from fastmaskformer.config import REPO_ROOT, load_config
from fastmaskformer.engine import Trainer
from fastmaskformer.engine import checkpoint as ckpt

DEBUG = os.path.join(REPO_ROOT, "configs", "debug.yaml")
COMMON = ["solver.max_iter=6", "train.checkpoint_period=2", "train.keep_last=3", "data.train_length=8",
          "train.vis_images=0", "train.resume=true"]


@pytest.fixture(autouse=True)
def _restore_process_settings():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after iteration 4: checkpoints of iterations 2 and 4."""
    out = str(tmp_path_factory.mktemp("stopped") / "run")
    Trainer(load_config(DEBUG, [f"train.output_dir={out}", *COMMON])).train(until=4)
    assert [i for i, _ in ckpt.list_checkpoints(out)] == [2, 4]
    return out


@pytest.fixture
def run(stopped_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(stopped_run, out)
    return out


def _trainer(out):
    return Trainer(load_config(DEBUG, [f"train.output_dir={out}", *COMMON]))


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # a copy that stopped half way


def _garbage(path):
    open(path, "wb").write(b"this is not a checkpoint\n" * 50)


@pytest.mark.parametrize("breaks", [_truncate, _garbage], ids=["truncated", "garbage"])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(run, breaks):
    newest, older = ckpt.checkpoint_path(run, 4), ckpt.checkpoint_path(run, 2)
    expected = torch.load(older, weights_only=True)["model"]
    breaks(newest)
    with pytest.raises(Exception) as direct:  # what torch.load itself says about the file
        torch.load(newest, weights_only=True)
    cause = f"{type(direct.value).__name__}: {str(direct.value).splitlines()[0]}"
    with pytest.warns(RuntimeWarning) as record:
        trainer = _trainer(run)
    messages = [str(w.message) for w in record if "resume" in str(w.message)]
    assert messages == [f"resume: skipping {newest}: cannot load it ({cause}); trying an older checkpoint"]
    assert trainer.iteration == 2
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    trainer.train(until=3)  # and training goes on from there
    assert trainer.iteration == 3


def test_a_file_that_loads_but_is_no_training_checkpoint_is_skipped(run):
    torch.save({"model": {}}, ckpt.checkpoint_path(run, 4))  # e.g. bare weights under a checkpoint's name
    with pytest.warns(RuntimeWarning, match=r"checkpoint_0000004.pth: expected a checkpoint with .* lacks "
                                            r"\['optimizer', 'scheduler'"):
        assert _trainer(run).iteration == 2


def test_resume_stops_with_every_file_it_tried_when_none_loads(run):
    _garbage(ckpt.checkpoint_path(run, 4))
    _truncate(ckpt.checkpoint_path(run, 2))
    with pytest.warns(RuntimeWarning), pytest.raises(ckpt.CheckpointError) as e:
        _trainer(run)
    message = str(e.value)
    assert f"no checkpoint in {run} could be loaded" in message
    lines = message.splitlines()[1:]
    assert [ln.split(": cannot load it")[0].strip() for ln in lines] == [ckpt.checkpoint_path(run, 4),
                                                                         ckpt.checkpoint_path(run, 2)]


def test_load_names_the_file_and_the_cause(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=rf"{tmp_path}/missing.pth: cannot load it \(FileNotFoundError"):
        ckpt.load(str(tmp_path / "missing.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ckpt.CheckpointError, match="list.pth: expected a checkpoint dict, got a list"):
        ckpt.load(str(tmp_path / "list.pth"))
