"""Batch jobs on Ray (a local instance, no network): the same rows as the local engine, a worker killed mid-job
retried with every row exactly once, and a killed driver's rerun resuming from the shards done."""

import json
import os
import signal
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray", reason="Ray is a dev dependency: make test installs it")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tiny_run, tmp_path_factory):
    from recreason.config import GenerateConfig
    from recreason.rundir import Run

    folder = tmp_path_factory.mktemp("cluster-job")

    data = Run(tiny_run[0]).dataset()
    rows = [{"user_id": r.user, "item_id": r.item} for r in data.subset(1, "test")[:14]]
    rows.insert(5, {"user_id": "someone", "item_id": "no-such-item"})  # an unknown id: rejected, not lost
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    gen = GenerateConfig(max_new_tokens=4, precision="fp32", batch_size=8)
    return tiny_run[0], gen, pairs, folder


def _local_rows(run, gen, pairs, out):
    from recreason.inference import Predictor
    from recreason.jobs import explain_pairs

    stats = explain_pairs(Predictor(run, gen), pairs, out, chunk_size=4, progress=False)
    return [json.loads(x) for x in out.read_text().splitlines()], stats


def test_the_ray_engine_writes_exactly_the_local_engines_rows(cluster, job):
    from recreason.jobs.cluster import explain_pairs_ray, read_shards

    run, gen, pairs, folder = job
    local, local_stats = _local_rows(run, gen, pairs, folder / "local.jsonl")
    stats = explain_pairs_ray(str(run), gen, pairs, folder / "ray", chunk_size=4, workers=2, address=cluster,
                              progress=False)
    shards = read_shards(folder / "ray")
    assert shards == local and len(shards) == 14
    assert stats["shards"] == 4 and stats["input_rows"] == local_stats["input_rows"] == 16
    assert stats["rows"] + stats["rejected"] == 16
    rejects = [json.loads(x) for x in (folder / "ray" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [6, 16]
    manifest = json.loads((folder / "ray" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 4


def test_a_worker_killed_mid_job_is_retried_and_every_row_written_once(cluster, job):
    from recreason.jobs.cluster import explain_pairs_ray, read_shards

    run, gen, pairs, folder = job
    killed = []

    def kill_a_busy_worker(shard, busy):
        if not killed and busy:
            killed.append(busy[0])
            ray.kill(busy[0], no_restart=False)  # the process dies with its task; Ray restarts it and retries

    stats = explain_pairs_ray(str(run), gen, pairs, folder / "killed", chunk_size=2, workers=2, address=cluster,
                              progress=False, on_shard=kill_a_busy_worker)
    rows = read_shards(folder / "killed")
    assert killed and stats["shards"] == 8
    assert [r["line"] for r in rows] == sorted({r["line"] for r in rows}) and len(rows) == 14
    assert rows == _local_rows(run, gen, pairs, folder / "again.jsonl")[0]


_DRIVER = """
import os, signal, sys
from recreason.config import GenerateConfig
from recreason.jobs.cluster import explain_pairs_ray
run, pairs, out, address, mode = sys.argv[1:6]
def die(shard, busy):
    if mode == "kill" and shard >= 1:
        os.kill(os.getpid(), signal.SIGKILL)
stats = explain_pairs_ray(run, GenerateConfig(max_new_tokens=4, precision="fp32", batch_size=8), pairs, out,
                          chunk_size=4, workers=1, address=address, progress=False, on_shard=die)
print(stats["resumed_shards"], stats["rows"])
"""


def test_a_killed_drivers_rerun_resumes_from_the_shards_done(cluster, job):
    from recreason.jobs.cluster import read_shards

    run, gen, pairs, folder = job
    out = folder / "resumed"
    args = [sys.executable, "-c", _DRIVER, str(run), str(pairs), str(out), cluster]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(args + ["kill"], capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = json.loads((out / "manifest.json").read_text())
    assert not done["complete"] and 1 <= len(done["shards"]) < 4
    again = subprocess.run(args + ["resume"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.split() == [str(len(done["shards"])), "14"]
    assert read_shards(out) == _local_rows(run, gen, pairs, folder / "local-again.jsonl")[0]
