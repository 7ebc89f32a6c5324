"""Multi-node pre-training as the Kubeflow Trainer runs it: the TrainJob's command (the launcher's
torchrun_command) on every node, configured only by the PET_* variables of the torch-distributed
runtime; two "nodes" here are two torchrun processes with one rank each on 127.0.0.1."""

import json
import os
import signal
import socket
import subprocess
import time

import psutil
import pytest
import torch
from test_pretrain import finish, history, launch, tokens, weights, write_params  # noqa: F401 (fixture)

from components.pretrain.launcher import torchrun_command

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_nodes(params, resume: bool = False, port: int | None = None) -> list[subprocess.Popen]:
    """Both nodes' torchrun."""
    port = port or free_port()
    nodes = []
    for node_rank in (0, 1):
        env = {key: value for key, value in os.environ.items()
               if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(HF_HUB_OFFLINE="1", PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(node_rank),
                   PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port))
        command = torchrun_command(["pretrain", "--params", str(params), *(["--resume"] if resume else [])])
        nodes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return nodes


@pytest.fixture(scope="module")
def two_nodes(tokens, tmp_path_factory):
    """An uninterrupted two-node run: 2 nodes x 1 rank x 1 reader, global batch 16, 6 epochs."""
    data, token_dir = tokens
    folder = tmp_path_factory.mktemp("two-nodes")
    params = write_params(folder, data, token_dir, workers=1, epochs=6, checkpoint_every=3)
    outputs = [finish(node) for node in start_nodes(params)]
    assert "2 rank(s) x 1 reader(s)" in outputs[0]
    return folder


def test_two_nodes_from_the_trainer_variables_match_one_process(tokens, two_nodes, tmp_path):
    data, token_dir = tokens
    finish(launch(write_params(tmp_path, data, token_dir, workers=2, epochs=6, checkpoint_every=3)))
    one, nodes = history(tmp_path), history(two_nodes)
    assert len(one) == len(nodes) == 24                     # 64 images, global batch 16, 6 epochs
    for a, b in zip(one, nodes):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["lr"] == b["lr"]
    for name, tensor in weights(two_nodes).items():
        torch.testing.assert_close(weights(tmp_path)[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_lost_node_stops_the_other_and_a_resumed_job_ends_as_if_uninterrupted(tokens, two_nodes, tmp_path):
    data, token_dir = tokens
    params = write_params(tmp_path, data, token_dir, workers=1, epochs=6, checkpoint_every=3)
    survivor, lost = start_nodes(params)
    latest = tmp_path / "out" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text() >= "step00000006"):
        assert time.monotonic() < deadline and survivor.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    for process in [*psutil.Process(lost.pid).children(recursive=True), psutil.Process(lost.pid)]:
        process.send_signal(signal.SIGKILL)                 # the node: torchrun and the rank it started
    lost.communicate()
    killed_at = time.monotonic()
    output, _ = survivor.communicate(timeout=120)
    waited = time.monotonic() - killed_at
    assert survivor.returncode != 0, "the surviving node finished as if nothing had happened"
    assert waited < 60, f"the surviving node took {waited:.0f} s to stop"
    assert not (tmp_path / "out" / "model.safetensors").exists()

    outputs = [finish(node) for node in start_nodes(params, resume=True)]   # what a TrainJob retry does
    assert "resuming at step" in outputs[0]
    assert history(tmp_path) == history(two_nodes)
    for name, tensor in weights(two_nodes).items():
        torch.testing.assert_close(weights(tmp_path)[name], tensor, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 24
