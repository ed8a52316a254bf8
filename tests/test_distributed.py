"""Data-parallel training through Accelerate: 2 CPU processes (gloo) against 1, same global batch."""

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(prepared_dir, model_dir, out, processes: int):
    args = ["train", str(prepared_dir), "--out", str(out), "--quiet", "--model", str(model_dir),
            "--max-steps", "4", "--batch-size", "8", "--lr", "0.01",
            "--set", "train.eval_every=2", "--set", "train.max_eval_records=16", "--set", "train.precision=fp32",
            "--set", "train.lora_r=4", "--set", "train.lora_dropout=0.0"]
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
