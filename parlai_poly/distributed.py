"""Batch negatives across workers of `parlai multiprocessing_train`.

With W workers of batch B, each context should be scored against all W x B labels, as one
big batch would be (ParlAI's rankers score only their own B). Candidate encodings are gathered
without gradient, then the worker's own rows are put back with theirs, first: the loss of each
worker's contexts then reaches its own candidates, DistributedDataParallel averages the rest,
and the label of context i stays at column i.
"""
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_negatives(local: torch.Tensor) -> torch.Tensor:
    """local [B, d] -> [B + others, d]: this worker's rows first, then every other worker's."""
    if not is_distributed():
        return local
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.size(0)]))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: local.size(0)] = local.detach()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)  # the last batch of an epoch may be smaller: pad, then cut
    others = [g[: int(n.item())] for i, (g, n) in enumerate(zip(gathered, sizes)) if i != rank]
    return torch.cat([local] + others)
