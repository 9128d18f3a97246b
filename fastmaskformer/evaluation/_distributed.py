"""Summing metric accumulators over ranks, so every rank ends with the whole dataset's statistics."""
import torch
import torch.distributed as dist


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (a no-op outside torch.distributed). NCCL needs the tensor on the
    rank's GPU, gloo on the CPU: the tensor travels to the backend's device and comes back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(device).clone()
    dist.all_reduce(buf)
    return buf.to(t.device)
