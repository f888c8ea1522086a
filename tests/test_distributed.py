"""Negatives gathered across two CPU workers on the gloo backend."""
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parlai_poly.distributed import gather_negatives


def _worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    try:
        local = torch.full((3 if rank == 0 else 2, 4), float(rank + 1), requires_grad=True)
        gathered = gather_negatives(local)
        gathered.sum().backward()
        results[rank] = (gathered.detach().tolist(), local.grad.tolist())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_score_every_label_of_both_batches():
    from parlai.utils.distributed import find_free_port

    port = find_free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
        first, second = results[0], results[1]
    # each worker sees its own rows first, then the other's: 3 + 2 candidates everywhere
    assert first[0] == [[1.0] * 4] * 3 + [[2.0] * 4] * 2
    assert second[0] == [[2.0] * 4] * 2 + [[1.0] * 4] * 3
    # gradient reaches the worker's own rows (the others' come from their own worker)
    assert first[1] == [[1.0] * 4] * 3 and second[1] == [[1.0] * 4] * 2


def test_single_process_is_unchanged():
    local = torch.randn(3, 4)
    assert gather_negatives(local) is local


@pytest.mark.slow
def test_multiprocessing_train_on_cpu_scores_both_workers_labels(tmp_path, tiny_backbone, synthetic_task):
    """`parlai multiprocessing_train` with 2 CPU workers and batch 16: 31 negatives, not 15."""
    parlai = os.path.join(os.path.dirname(sys.executable), "parlai")
    model_file = str(tmp_path / "model")
    command = [
        parlai, "multiprocessing_train", "--distributed-world-size", "2",
        "-t", synthetic_task["task"], "--fromfile-datapath", synthetic_task["fromfile_datapath"],
        "--fromfile-datatype-extension", "true", "-m", "parlai_poly.agents:bi", "-mf", model_file,
        "--hf-model", tiny_backbone, "-bs", "16", "--num-epochs", "0.5", "-lr", "1e-3",
        "--freeze-embeddings", "false", "--log-every-n-secs", "0.1",
    ]
    # its own session, so a hung run's spawned worker dies with it and the log says where it hung
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail("multiprocessing_train did not exit within 300 s; its last output:\n" + output[-3000:])
    assert process.returncode == 0, output[-3000:]
    assert '"negatives": 31.0' in output
    assert os.path.isfile(model_file)
