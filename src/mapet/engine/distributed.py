"""One entry point for every scale: a plain process, torchrun on one machine, torchrun on many
nodes (a Kubeflow Trainer TrainJob). gloo on CPUs, NCCL on GPUs."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed(collective_timeout_s: float = 600) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Without a launcher, this process becomes a world of one
    (DeepSpeed would otherwise look for MPI).

    A collective that waits longer than ``collective_timeout_s`` for a peer (a lost node) fails
    the process. On gloo a dead peer's closed connection fails it at once; NCCL's watchdog
    aborts the communicators and ends the process at the timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    unless set otherwise), so the TrainJob fails and can be retried instead of hanging.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # DeepSpeed makes its data-parallel groups without a timeout, so they would take torch's
    # defaults (30 min on gloo) instead of the world group's: a node cut off the network (no
    # connection reset) then hung its peers for half an hour.
    timeout = timedelta(seconds=collective_timeout_s)
    dist.distributed_c10d.default_pg_timeout = dist.distributed_c10d.default_pg_nccl_timeout = timeout
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                               timeout=timeout)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def teardown(finished: bool = True) -> None:
    """Without the barrier, 2-rank gloo runs abort at exit about one time in three; after a
    failure there is no barrier, since a peer may be gone."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
