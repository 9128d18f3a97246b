"""The training engine on the CPU: a short run that learns, exact resume, atomic checkpoints, the
optimizer's parameter groups and schedule, gradient clipping, AMP, and the resumable data stream."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastmaskformer.config import REPO_ROOT, ConfigError, load_config
from fastmaskformer.data import SyntheticDataset
from fastmaskformer.engine import Trainer
from fastmaskformer.engine import checkpoint as ckpt
from fastmaskformer.engine.data import EpochSeeded, ResumableSampler, ShardSampler, TrainBatches
from fastmaskformer.engine.metrics import MetricsWriter, read_metrics
from fastmaskformer.engine.optim import build_optimizer, build_scheduler, lr_factor
from fastmaskformer.engine.build import build_model
from fastmaskformer.train import main

DEBUG = os.path.join(REPO_ROOT, "configs", "debug.yaml")


def debug_config(out, *overrides):
    return load_config(DEBUG, [f"train.output_dir={out}", *overrides])


@pytest.fixture(autouse=True)
def _restore_process_settings():
    """A Trainer sets threads and determinism for its whole process; later tests get theirs back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def _losses(out):
    return [(r["iter"], r["loss"]) for r in read_metrics(os.path.join(out, "metrics.jsonl"), "loss")]


def test_short_run_learns_and_writes_its_outputs(tmp_path):
    out = str(tmp_path / "run")
    # Two training images, i.e. the same batch every step: the loss must fall quickly.
    results = main(["--config", DEBUG, f"train.output_dir={out}", "data.train_length=2", "solver.max_iter=16",
                    "train.checkpoint_period=5", "train.keep_last=2"])
    losses = [loss for _, loss in _losses(out)]
    assert len(losses) == 16
    # The first loss is the untrained one; after it the curve keeps falling.
    assert losses[-1] < 0.6 * losses[0] and np.mean(losses[-3:]) < 0.9 * np.mean(losses[1:4]), losses

    rows = read_metrics(os.path.join(out, "metrics.jsonl"), "lr")
    for r in rows:  # the lr of step i (1-based) follows the poly schedule at iteration i - 1
        assert r["lr"] == pytest.approx(1e-3 * (1 - (r["iter"] - 1) / 16) ** 0.9, rel=1e-6)
    val = read_metrics(os.path.join(out, "metrics.jsonl"), "val/mIoU")
    assert len(val) == 1 and val[0]["iter"] == 16 and val[0]["val/mIoU"] == pytest.approx(results["mIoU"])

    assert [i for i, _ in ckpt.list_checkpoints(out)] == [15, 16]  # keep_last=2 of 5, 10, 15 and the final 16
    assert ckpt.load(os.path.join(out, "checkpoint_0000016.pth"))["iteration"] == 16
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert set(final) == {"model", "config"} and load_config(os.path.join(out, "config.yaml")).solver.max_iter == 16
    # 2 rows of image | ground truth | prediction (64 pixels each, 4 apart), then the legend.
    png = np.asarray(Image.open(os.path.join(out, "predictions.png")).convert("RGB"))
    assert png.shape[1] == 3 * 64 + 2 * 4 and png.shape[0] > 2 * (64 + 4)
    val = SyntheticDataset("val", length=2, image_size=64)
    for row in range(2):
        sample, top = val[row], row * (64 + 4)
        image = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(png[top:top + 64, :64], image)
        gt = png[top:top + 64, 68:132].reshape(-1, 3)
        colours = {k: np.unique(gt[(sample["sem_seg"] == k).reshape(-1).numpy()], axis=0)
                   for k in sample["sem_seg"].unique().tolist()}
        assert all(len(c) == 1 for c in colours.values())  # one colour per class ...
        assert len({tuple(c[0]) for c in colours.values()}) == len(colours)  # ... and distinct ones


def test_resume_continues_exactly(tmp_path):
    common = ["train.deterministic=true", "solver.max_iter=6", "train.checkpoint_period=3", "data.train_length=8",
              "train.vis_images=0"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # The uninterrupted run also evaluates every 2 iterations: evaluation must not move its random streams.
    full = Trainer(debug_config(a, *common, "train.eval_period=2"))
    full_results = full.train()

    first = Trainer(debug_config(b, *common, "train.resume=true"))  # nothing to resume from yet
    assert first.iteration == 0 and first.train(until=3) == {}
    del first
    # A writer killed mid-checkpoint leaves a temporary file behind; resuming must ignore it.
    open(os.path.join(b, ".tmp_checkpoint_0000006.pth.killed"), "wb").write(b"PK\x03\x04torn")
    second = Trainer(debug_config(b, *common, "train.resume=true"))
    assert second.iteration == 3
    resumed_results = second.train()

    assert _losses(b) == _losses(a) and len(_losses(a)) == 6  # bit-exact loss curves
    for (name, x), y in zip(full.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(x, y), name
    assert resumed_results["mIoU"] == full_results["mIoU"]
    assert not [n for n in os.listdir(b) if n.startswith(".tmp_")]


def test_checkpoint_killed_mid_write_leaves_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint_0000010.pth")
    ckpt.save_atomic({"iteration": 10, "w": torch.arange(5.0)}, path)

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 100)  # a torn zip archive
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="no space"):
        ckpt.save_atomic({"iteration": 20, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    state = ckpt.load(path)
    assert state["iteration"] == 10 and torch.equal(state["w"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["checkpoint_0000010.pth"]  # the temporary file is gone


def test_prune_keeps_the_newest(tmp_path):
    for it in (3, 10, 7, 12):
        ckpt.save_atomic({"iteration": it}, ckpt.checkpoint_path(str(tmp_path), it))
    open(tmp_path / ".tmp_checkpoint_0000013.pth.x", "wb").close()
    ckpt.prune(str(tmp_path), keep_last=2)
    assert [i for i, _ in ckpt.list_checkpoints(str(tmp_path))] == [10, 12]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0000010.pth", "checkpoint_0000012.pth"]


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_atomic({"rng": ckpt.rng_state()}, str(tmp_path / "r.pth"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    ckpt.set_rng_state(ckpt.load(str(tmp_path / "r.pth"))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


@pytest.fixture(scope="module")
def model():
    return build_model(load_config(DEBUG))


def test_param_groups(model):
    cfg = load_config(DEBUG, ["solver.lr=1e-3", "solver.weight_decay=0.05", "solver.backbone_multiplier=0.1"]).solver
    opt = build_optimizer(model, cfg)
    where = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(where) == len(list(model.parameters()))
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    assert embeddings  # the query embeddings
    for m in embeddings:
        assert where[id(m.weight)] == (1e-3, 0.0)
    backbone_convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    backbone_norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    other_norms = [m for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    linears = [m for m in model.transformer_decoder.modules() if isinstance(m, nn.Linear)]
    assert backbone_convs and backbone_norms and other_norms and linears
    assert all(where[id(m.weight)] == (1e-4, 0.05) for m in backbone_convs)
    assert all(where[id(p)] == (1e-4, 0.0) for m in backbone_norms for p in m.parameters())
    assert all(where[id(p)] == (1e-3, 0.0) for m in other_norms for p in m.parameters())
    assert all(where[id(m.weight)] == (1e-3, 0.05) for m in linears)


def test_lr_schedule():
    cfg = load_config(None, ["solver.lr_scheduler=step", "solver.steps=[8, 6]", "solver.gamma=0.5",
                             "solver.warmup_iters=4", "solver.warmup_factor=0.1", "solver.max_iter=10"]).solver
    assert [lr_factor(i, cfg) for i in (0, 2, 4, 5, 6, 7, 8, 9)] == pytest.approx(
        [0.1, 0.55, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    poly = load_config(None, ["solver.max_iter=10"]).solver
    assert [lr_factor(i, poly) for i in (0, 5, 9)] == pytest.approx([1.0, 0.5 ** 0.9, 0.1 ** 0.9])
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr": 2.0},
                             {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.2}])
    sched = build_scheduler(opt, poly)
    for _ in range(5):
        opt.step(), sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.0 * 0.5 ** 0.9, 0.2 * 0.5 ** 0.9])


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return Trainer(debug_config(str(tmp_path_factory.mktemp("step")), "solver.clip_grad=0.01"))


def test_step_clips_the_whole_models_gradient_norm(trainer):
    stats = trainer.step(next(trainer.batches.from_iteration(0)))
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) <= 0.01 * (1 + 1e-4)
    assert stats["grad_norm"] > 0.01 and torch.isfinite(stats["loss"])  # reported before clipping


def test_bf16_autocast_step(trainer, monkeypatch):
    monkeypatch.setattr(trainer.cfg.solver, "amp", "bf16")
    stats = trainer.step(next(trainer.batches.from_iteration(0)))
    assert torch.isfinite(stats["loss"])


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    with pytest.raises(ConfigError, match="solver.amp"):
        Trainer(debug_config(str(tmp_path), "solver.amp=fp16"))


def test_tensorboard_flag(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="tensorboard"):
            MetricsWriter(str(tmp_path), tensorboard=True)
        return
    writer = MetricsWriter(str(tmp_path), tensorboard=True)
    writer.write(1, {"loss": 2.0})
    writer.close()
    assert os.listdir(tmp_path / "tensorboard")


def test_metrics_are_json_lines(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(3, {"loss": 1.5, "lr": 1e-4})
    writer.write(4, {"mIoU": float("nan")}, prefix="val/")
    MetricsWriter(str(tmp_path), enabled=False).write(5, {"loss": 9.0})  # another rank: writes nothing
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == [{"iter": 3, "loss": 1.5, "lr": 1e-4},
                                                             {"iter": 4, "val/mIoU": None}]


def test_data_stream_resumes_at_any_iteration():
    ds = SyntheticDataset("train", length=6, image_size=32)
    stream = TrainBatches(ds, batch_size=2, rank=0, world_size=1, seed=5, num_workers=0, size_divisibility=32,
                          ignore_label=255)
    files = [b["files"] for _, b in zip(range(8), stream.from_iteration(0))]  # 3 batches per epoch
    assert sorted(f for batch in files[:3] for f in batch) == sorted(ds[i]["file"] for i in range(6))
    assert files[:3] != files[3:6]  # a new permutation every epoch
    for start in (2, 4):
        assert [b["files"] for _, b in zip(range(8 - start), stream.from_iteration(start))] == files[start:]


class _Random:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return random.random(), np.random.rand(), torch.rand(1).item()


def test_augmentation_is_seeded_per_epoch_and_index():
    ds = EpochSeeded(_Random(), seed=0)
    state = torch.get_rng_state()
    first = [ds[i] for i in range(4)]
    assert torch.equal(torch.get_rng_state(), state)  # the training stream did not move
    assert [ds[i] for i in range(4)] == first and len(set(first)) == 4
    ds.epoch = 1
    assert [ds[i] for i in range(4)] != first


def test_samplers_split_the_data_between_ranks():
    ds = list(range(10))
    epoch = [list(ResumableSampler(ds, r, 2, seed=0)) for r in range(2)]
    assert not set(epoch[0]) & set(epoch[1]) and len(epoch[0]) == len(epoch[1]) == 5
    shards = [list(ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(7))


# ------------------------------------------------------------------ model building and module layering
def test_build_model_builds_the_configured_maskformer():
    import fastmaskformer

    cfg = load_config(DEBUG, ["data.num_classes=5", "model.num_queries=3", "model.dec_layers=2"])
    model = build_model(cfg, thing_classes=[4, 1])
    assert type(model) is fastmaskformer.MaskFormer
    assert model.num_classes == 5 and model.thing_classes == (1, 4)
    assert model.head.class_embed.out_features == 6 and model.transformer_decoder.query_embed.weight.shape[0] == 3
    out = model(torch.rand(1, 3, 64, 64))
    assert out["pred_logits"].shape == (1, 3, 6) and len(out["aux_outputs"]) == 1


class _FakeMask2Former(nn.Module):
    """Stands in for fastmaskformer.Mask2Former: takes a subset of MaskFormer's options."""

    def __init__(self, num_classes, backbone="resnet50", num_queries=100, dec_layers=9, fused=False,
                 thing_classes=None):
        super().__init__()
        self.kwargs = dict(num_classes=num_classes, backbone=backbone, num_queries=num_queries, dec_layers=dec_layers,
                           fused=fused, thing_classes=thing_classes)


def test_build_model_selects_mask2former_by_name(monkeypatch):
    import fastmaskformer

    monkeypatch.setattr(fastmaskformer, "Mask2Former", _FakeMask2Former, raising=False)
    cfg = load_config(None, ["model.meta_architecture=mask2former", "model.num_queries=7", "model.dec_layers=4",
                             "model.fused=true", "data.num_classes=3"])
    model = build_model(cfg, thing_classes=[0])
    assert isinstance(model, _FakeMask2Former)
    assert model.kwargs == dict(num_classes=3, backbone="resnet18", num_queries=7, dec_layers=4, fused=True,
                                thing_classes=[0])
    # An option this class does not take may not be set: it would silently do nothing.
    with pytest.raises(ConfigError, match=r"model.pixel_decoder: _FakeMask2Former has no such option.*transformer_enc"):
        build_model(load_config(None, ["model.meta_architecture=mask2former",
                                       "model.pixel_decoder=transformer_encoder"]))


def test_build_model_without_mask2former_says_so(monkeypatch):
    import fastmaskformer

    monkeypatch.delattr(fastmaskformer, "Mask2Former", raising=False)
    with pytest.raises(ConfigError, match="model.meta_architecture: 'mask2former' needs fastmaskformer.Mask2Former"):
        build_model(load_config(None, ["model.meta_architecture=mask2former"]))
    with pytest.raises(ConfigError, match="model.meta_architecture"):
        load_config(None, ["model.meta_architecture=detr"])


ENGINE_FILES = ["fastmaskformer/train.py", "fastmaskformer/evaluate.py"] + sorted(
    os.path.relpath(p, REPO_ROOT) for p in __import__("glob").glob(os.path.join(REPO_ROOT, "fastmaskformer", "engine",
                                                                              "*.py")))


def _package_imports(path):
    """(module-level?, imported fastmaskformer module) for every import of the package in ``path``."""
    import ast

    tree = ast.parse(open(os.path.join(REPO_ROOT, path)).read())
    package = ".".join(path[:-3].split("/")[:-1])
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            names = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(id(node) in top, n) for n in names if n.startswith("fastmaskformer")]
    return found


@pytest.mark.parametrize("path", ENGINE_FILES)
def test_engine_imports_are_module_level_and_point_down(path):
    imports = _package_imports(path)
    assert [n for top, n in imports if not top] == [], "function-level imports hide import cycles"
    if path.startswith("fastmaskformer/engine/"):  # the engine never imports the entry points above it
        assert not [n for _, n in imports if n.split(".")[:2] in (["fastmaskformer", "evaluate"],
                                                                  ["fastmaskformer", "train"])]


@pytest.mark.parametrize("first", ["fastmaskformer.evaluate", "fastmaskformer.engine.trainer", "fastmaskformer.train"])
def test_entry_points_import_in_any_order(first):
    import subprocess
    import sys

    code = f"import {first}; import fastmaskformer.evaluate, fastmaskformer.train; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_compiled_steps_equal_eager_steps(tmp_path):
    """train.compile=true compiles the forward and the criterion's losses; the first two steps give
    the eager steps' losses (dropout off, so both runs compute the same thing). The aot_eager
    backend traces forward and backward as inductor would, without its minutes of code generation
    on this CPU (the benchmarks run inductor)."""
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        trainer = Trainer(debug_config(str(tmp_path / f"c{compiled}"), "model.dropout=0.0", "model.fused=true",
                                       f"train.compile={str(compiled).lower()}", "train.compile_backend=aot_eager"))
        batches = trainer.batches.from_iteration(0)
        losses[compiled] = [float(trainer.step(next(batches))["loss"]) for _ in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
