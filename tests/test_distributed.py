"""Two gloo processes train the debug model with DDP: identical weights on both ranks afterwards,
and the criterion's num_masks averaged over the ranks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from fastmaskformer.config import REPO_ROOT, load_config

DEBUG = os.path.join(REPO_ROOT, "configs", "debug.yaml")
WORLD = 2
TARGETS_PER_RANK = (1, 4)


def _targets(n: int, size: int = 64):
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        masks[i, 8 * i: 8 * i + 16, 4 * i: 4 * i + 24] = True
    return [{"labels": torch.arange(n) % 8, "masks": masks}]


def _worker(rank: int, out: str, port: int) -> None:
    # What torchrun sets for each process.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from fastmaskformer.engine import Trainer

    cfg = load_config(DEBUG, [f"train.output_dir={out}", "solver.max_iter=3", "solver.batch_size=4",
                              "train.checkpoint_period=2", "train.vis_images=0"])
    trainer = Trainer(cfg)
    assert isinstance(trainer.net, torch.nn.parallel.DistributedDataParallel)
    results = trainer.train()
    params = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}

    # Each rank has a different number of targets; both must divide by their average.
    model = trainer.model.eval()
    targets = _targets(TARGETS_PER_RANK[rank])
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(rank)))
        distributed = model.criterion(outputs, targets)
        dist.destroy_process_group()
        alone = model.criterion(outputs, targets)
    torch.save({"params": params, "results": results, "distributed": distributed, "alone": alone},
               os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(out, free_port()), nprocs=WORLD, join=True)
    return out, [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_ranks_end_with_identical_weights(ranks):
    out, (r0, r1) = ranks
    initial = torch.load(os.path.join(out, "checkpoint_0000002.pth"), weights_only=True)["model"]
    changed = 0
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
        changed += not torch.equal(p, initial[name])
    assert changed > len(r0["params"]) // 2  # and they did train after the checkpoint at iteration 2
    # Rank 0 alone writes checkpoints; both evaluated their half of the validation set into one result.
    assert [n for n in sorted(os.listdir(out)) if n.startswith("checkpoint_")] == \
        ["checkpoint_0000002.pth", "checkpoint_0000003.pth"]
    assert r0["results"]["mIoU"] == r1["results"]["mIoU"]


def test_num_masks_is_averaged_over_ranks(ranks):
    _, results = ranks
    mean = sum(TARGETS_PER_RANK) / WORLD
    for n, r in zip(TARGETS_PER_RANK, results):
        for key in ("loss_mask", "loss_dice"):  # divided by num_masks: n alone, the mean of the ranks together
            torch.testing.assert_close(r["distributed"][key] * mean, r["alone"][key] * n)
        torch.testing.assert_close(r["distributed"]["loss_ce"], r["alone"]["loss_ce"])
