"""Data-parallel training through Accelerate: 2 CPU processes (gloo) against 1, same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import reloaded_validation_loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(prepared_dir, model_dir, out, processes: int, *extra: str):
    args = ["train", str(prepared_dir), "--out", str(out), "--quiet", "--model", str(model_dir),
            "--max-steps", "4", "--batch-size", "8", "--lr", "0.01",
            "--set", "train.eval_every=2", "--set", "train.max_eval_records=16", "--set", "train.precision=fp32",
            "--set", "train.lora_r=4", "--set", "train.lora_dropout=0.0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "recreason.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "recreason.cli", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()], \
        json.loads((out / "summary.json").read_text())


def test_two_processes_follow_the_single_process_loss_curve(prepared_dir, tiny_model_dir, tmp_path):
    single, _ = _train(prepared_dir, tiny_model_dir, tmp_path / "one", 1)
    double, summary = _train(prepared_dir, tiny_model_dir, tmp_path / "two", 2)
    assert summary["processes"] == 2
    assert [e["step"] for e in double] == [e["step"] for e in single] == [2, 4]
    for a, b in zip(single, double):
        assert b["validation_loss"] == pytest.approx(a["validation_loss"], rel=2e-3)
    assert single[-1]["validation_loss"] < single[0]["validation_loss"]


def test_fsdp_shards_the_model_and_follows_the_single_process_curve(prepared_dir, tiny_model_dir, tmp_path):
    """train.fsdp: the model is sharded across 2 gloo processes (FSDP2); same losses as 1 process, and the
    saved adapter and resumable checkpoint are whole (gathered), loadable without any process group."""
    import torch
    from safetensors.torch import load_file

    single, _ = _train(prepared_dir, tiny_model_dir, tmp_path / "one", 1)
    sharded, summary = _train(prepared_dir, tiny_model_dir, tmp_path / "fsdp", 2, "--set", "train.fsdp=true")
    assert summary["processes"] == 2 and summary["config"]["fsdp"] is True
    for a, b in zip(single, sharded):
        assert b["validation_loss"] == pytest.approx(a["validation_loss"], rel=2e-3)
    # Adam's first steps amplify float noise in the tiny model's gradients, so the weights are compared
    # within the run: best (step 4, the best pass) and last (step 4) were gathered separately from the shards.
    assert sharded[-1]["best"] and sharded[-1]["step"] == 4
    one = load_file(tmp_path / "one" / "best" / "adapter_model.safetensors")
    best = load_file(tmp_path / "fsdp" / "best" / "adapter_model.safetensors")
    assert best.keys() == one.keys() and all(best[k].shape == one[k].shape for k in one)
    last = load_file(tmp_path / "fsdp" / "last" / "trainable.safetensors")
    as_peft = {k.removeprefix("lm.").replace(".default.", "."): v for k, v in last.items()}
    assert as_peft.keys() == best.keys()
    assert all(torch.equal(as_peft[k], best[k]) for k in best)
    state = torch.load(tmp_path / "fsdp" / "last" / "state.pt", weights_only=True)
    assert state["optimizer"]["state"]  # the full optimizer state, keyed by parameter name
    # The gathered best checkpoint reloads without a process group and scores what the sharded run scored.
    assert reloaded_validation_loss(tmp_path / "fsdp") == pytest.approx(summary["best_validation_loss"], rel=1e-3)


_FSDP_RUN = """
import ast, os, signal, sys
from recreason.config import TrainConfig
from recreason.training.trainer import train

def kill_at_3(step, model):
    if step == 3:  # one step after the step-2 checkpoint, on every process
        os.kill(os.getpid(), signal.SIGKILL)

mode = sys.argv[4]
train(sys.argv[1], sys.argv[2], TrainConfig(**ast.literal_eval(sys.argv[3])), progress=False,
      on_step=kill_at_3 if mode == "kill" else None, resume=mode == "resume")
"""


def test_fsdp_run_killed_mid_training_resumes_to_the_same_result(prepared_dir, tiny_model_dir, tmp_path):
    """Sharded checkpoints are written whole and restored into the shards (weights and optimizer state)."""
    cfg = repr(dict(model=str(tiny_model_dir), method="lora", lora_r=4, lr=1e-2, batch_size=8, max_steps=4,
                    eval_every=2, checkpoint_every=2, max_eval_records=16, precision="fp32", fsdp=True))

    def launch(out, mode):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "--no-python", sys.executable, "-c", _FSDP_RUN,
               str(prepared_dir), str(out), cfg, mode]
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)

    straight = launch(tmp_path / "a", "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = launch(tmp_path / "b", "kill")
    assert killed.returncode != 0 and not (tmp_path / "b" / "summary.json").exists()
    resumed = launch(tmp_path / "b", "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert b["steps"] == 4 and b["best_validation_loss"] == pytest.approx(a["best_validation_loss"], rel=1e-6)


def test_two_nodes_rendezvous_and_follow_the_single_process_curve(prepared_dir, tiny_model_dir, tmp_path):
    """The multi-node launch the README documents, as two "nodes" on one machine: two torchrun launchers with
    --nnodes 2 and a c10d rendezvous on 127.0.0.1, one process each; node 0 writes the run."""
    single, _ = _train(prepared_dir, tiny_model_dir, tmp_path / "one", 1)
    out = tmp_path / "nodes"
    args = ["train", str(prepared_dir), "--out", str(out), "--quiet", "--model", str(tiny_model_dir),
            "--max-steps", "4", "--batch-size", "8", "--lr", "0.01",
            "--set", "train.eval_every=2", "--set", "train.max_eval_records=16", "--set", "train.precision=fp32",
            "--set", "train.lora_r=4", "--set", "train.lora_dropout=0.0"]
    endpoint = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                               "--rdzv-id=recreason-test", "--local-addr=127.0.0.1", "-m", "recreason.cli", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and [e["step"] for e in log] == [2, 4]
    for a, b in zip(single, log):
        assert b["validation_loss"] == pytest.approx(a["validation_loss"], rel=2e-3)
