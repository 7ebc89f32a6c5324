"""One entry point for every scale: a plain process, torchrun on one machine, torchrun on many
nodes (a Kubeflow Trainer TrainJob). gloo on CPUs, NCCL on GPUs."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Without a launcher, this process becomes a world of one
    (DeepSpeed would otherwise look for MPI)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def teardown() -> None:
    """Without the barrier, 2-rank gloo runs abort at exit about one time in three."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
