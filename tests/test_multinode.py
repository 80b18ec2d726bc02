"""Several machines: two torchrun launchers on this machine, each one "node" of one process, meet through the c10d
rendezvous (--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT) as a cluster's nodes would, and train
exactly as two processes of one launcher do (the same code path: RANK, LOCAL_RANK and WORLD_SIZE from torchrun)."""

import os
import socket
import subprocess
import sys

import pytest
from test_dreambooth import args, finish, losses, run, setup  # noqa: F401 (setup: a fixture)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(cli_args, endpoint):
    """One node's launcher: one process, rendezvous at `endpoint` (the first node's address, as on a cluster)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={endpoint}", "--rdzv-id=plainxl-test", "-m", "train.dreambooth", *cli_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_nodes_through_the_rendezvous_equal_two_processes_of_one_launcher(setup, tmp_path):
    one_launcher, two_nodes = tmp_path / "one_launcher", tmp_path / "two_nodes"
    finish(run(args(setup, one_launcher, batch_size=1, train=["unet"]), nproc=2))
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [node(args(setup, two_nodes, batch_size=1, train=["unet"]), endpoint) for _ in range(2)]
    for proc in nodes:
        finish(proc)
    a, b = losses(one_launcher), losses(two_nodes)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == rb["loss"], f"step {ra['step']}: {ra['loss']} vs {rb['loss']}"
    assert (one_launcher / "model.safetensors").read_bytes() == (two_nodes / "model.safetensors").read_bytes()
