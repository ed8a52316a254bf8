"""Batch jobs on Ray: the rows the local engine writes, as shards that a cluster of workers writes in parallel.

    recreason explain --run RUN --pairs F --out DIR --engine ray [--address ADDR] [--workers N]
    recreason recommend --run RUN --all-users -k K --out DIR --engine ray [--address ADDR] [--workers N]

The driver reads the input as the local engine does (bad rows and unknown ids go to ``DIR/rejects.jsonl`` with
their line), cuts it into shards of ``--chunk-size`` rows and hands them to ``N`` Ray actors, each of which loads
the run once and holds a :class:`~recreason.inference.Predictor` (:func:`~recreason.jobs.batch.explain_rows` and
:func:`~recreason.jobs.batch.recommend_rows` make the rows, exactly as locally). Each finished shard is written by
the driver, atomically, as ``DIR/part-NNNNN.jsonl`` (or ``.parquet``); ``DIR/manifest.json`` names the job (input
file and hash, run fingerprint, options, shard size) and the shards done. So:

* a worker killed mid-shard is restarted by Ray and the shard is retried on it (``max_restarts``,
  ``max_task_retries``); the driver writes a shard once, so every row appears exactly once;
* a killed driver's rerun (the same command) skips the shards the manifest holds;
* a manifest of another job is refused, saying what differs.

Without ``--address`` a local Ray instance is started (no dashboard, nothing listening beyond loopback).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from recreason.config import GenerateConfig
from recreason.errors import ConfigError
from recreason.jobs.batch import Pair, differing, file_digest, read_pairs, write_rejects, write_rows

SHARD_FORMATS = ("jsonl", "parquet")


class Worker:
    """One Ray actor's state: a Predictor over the run, loaded once, with ``threads`` torch threads."""

    def __init__(self, run: str, generate: dict, cold_start: str, threads: int):
        import torch

        from recreason.inference import Predictor

        torch.set_num_threads(max(1, threads))
        self.predictor = Predictor(run, GenerateConfig(**generate), cold_start=cold_start)

    def pid(self) -> int:
        return os.getpid()

    def model_tag(self) -> str:
        return self.predictor.model_tag

    def explain(self, pairs: list[dict], options: dict | None) -> list[dict]:
        from recreason.jobs.batch import explain_rows

        return explain_rows(self.predictor, [Pair(**p) for p in pairs], options)

    def recommend(self, users: list[str], k: int, options: dict | None) -> list[dict]:
        from recreason.jobs.batch import recommend_rows

        return recommend_rows(self.predictor, users, k, options)


def start_ray(address: str | None, workers: int):
    """Connect to the cluster at ``address``, or start a local instance sized for ``workers`` actors."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'recreason[ray]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")  # a local instance listens on loopback only
    return ray


class ShardWriter:
    """``DIR/part-NNNNN.FORMAT`` written atomically, and ``DIR/manifest.json`` (the job and its shards done)."""

    def __init__(self, out: Path, job: dict, fmt: str):
        if fmt not in SHARD_FORMATS:
            raise ConfigError(f"--format {fmt!r}: shards are one of {', '.join(SHARD_FORMATS)}")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: with --engine ray the output is a folder of shards, and this is a file")
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.fmt, self.job = out, fmt, job
        self.manifest = out / "manifest.json"
        self.done: dict[str, dict] = {}
        if self.manifest.exists():
            try:
                saved = json.loads(self.manifest.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("job") != job:
                raise ConfigError(f"{self.manifest} is the manifest of another job "
                                  f"({differing(saved.get('job'), job)}); give another --out or delete the folder "
                                  "to start over")
            self.done = {k: v for k, v in saved.get("shards", {}).items() if (out / v["file"]).exists()}

    def path(self, shard: int) -> Path:
        return self.out / f"part-{shard:05d}.{self.fmt}"

    def write(self, shard: int, rows: list[dict], rejected: list[dict]) -> None:
        write_rows(self.path(shard), rows)  # atomic: a temporary file renamed into place
        self.done[f"{shard:05d}"] = {"file": self.path(shard).name, "rows": len(rows), "rejected": rejected}
        self.save(complete=False)

    def rejected(self) -> list[dict]:
        """The rows every shard done refused (unknown ids), kept in the manifest so a rerun still reports them."""
        return [r for shard in self.done.values() for r in shard.get("rejected", [])]

    def save(self, complete: bool) -> None:
        tmp = self.manifest.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps({"job": self.job, "shards": dict(sorted(self.done.items())), "complete": complete},
                                  indent=1) + "\n")
        os.replace(tmp, self.manifest)


def _run_shards(ray, actors, shards: list, call: Callable, writer: ShardWriter, progress: bool, desc: str,
                on_shard=None) -> dict:
    """Send each shard not yet done to a free actor; write each result as it comes back."""
    todo = [(n, shard) for n, shard in enumerate(shards) if f"{n:05d}" not in writer.done]
    resumed = len(shards) - len(todo)
    bar = tqdm(total=len(shards), initial=resumed, desc=desc, unit="shard", disable=not progress)
    start, new_rows = time.time(), 0
    pending: dict = {}
    free = list(actors)
    while todo or pending:
        while todo and free:
            n, shard = todo.pop(0)
            actor = free.pop(0)
            pending[call(actor, shard)] = (n, actor)
        ready, _ = ray.wait(list(pending), num_returns=1)
        n, actor = pending.pop(ready[0])
        free.append(actor)
        rows = ray.get(ready[0])
        kept = [r for r in rows if "rejected" not in r]
        writer.write(n, kept, [{"line": r["line"], "reason": r["rejected"], "raw": r.get("raw", "")}
                               for r in rows if "rejected" in r])
        new_rows += len(kept)
        bar.update(1)
        if on_shard is not None:  # (shard written, actors busy with another shard): for tests and progress hooks
            on_shard(n, [busy for _, busy in pending.values()])
    bar.close()
    writer.save(complete=True)
    seconds = time.time() - start
    return {"shards": len(shards), "resumed_shards": resumed, "rows": sum(v["rows"] for v in writer.done.values()),
            "new": new_rows, "seconds": seconds, "reasons_per_second": new_rows / seconds if seconds > 0 else 0.0}


def _actors(ray, run: str, gen: GenerateConfig, cold_start: str, workers: int) -> list:
    cpus = ray.cluster_resources().get("CPU", 1)
    per = max(1, int(cpus // workers))
    remote = ray.remote(num_cpus=per, max_restarts=3, max_task_retries=3)(Worker)
    actors = [remote.remote(str(Path(run).resolve()), asdict(gen), cold_start, per) for _ in range(workers)]
    ray.get([a.pid.remote() for a in actors])  # every model loaded before the clock starts
    return actors


def _job(kind: str, tag: str, gen: GenerateConfig, options, shard_rows: int, fmt: str, **extra) -> dict:
    job = {"kind": kind, "model": tag, "generate": asdict(gen), "options": options or {}, "shard_rows": shard_rows,
           "format": fmt, **extra}
    return json.loads(json.dumps(job, default=str))


def explain_pairs_ray(run: str, gen: GenerateConfig, pairs_file: str | Path, out: str | Path, chunk_size: int = 256,
                      options: dict | None = None, workers: int = 1, address: str | None = None, fmt: str = "jsonl",
                      cold_start: str = "item-only", progress: bool = True, on_shard=None) -> dict:
    """:func:`~recreason.jobs.batch.explain_pairs` on Ray: the same rows, as shards of ``chunk_size`` pairs."""
    from recreason.rundir import Run

    if chunk_size < 1 or workers < 1:
        raise ConfigError("--chunk-size and --workers must be at least 1")
    out, pairs_file = Path(out), Path(pairs_file)
    pairs, rejects = read_pairs(pairs_file)
    job = _job("explain", Run(run).fingerprint(), gen, options, chunk_size, fmt, input=str(pairs_file.resolve()),
               bytes=pairs_file.stat().st_size, sha256=file_digest(pairs_file))
    writer = ShardWriter(out, job, fmt)
    ray = start_ray(address, workers)
    actors = _actors(ray, run, gen, cold_start, workers)
    shards = [[asdict(p) for p in pairs[n:n + chunk_size]] for n in range(0, len(pairs), chunk_size)]
    stats = _run_shards(ray, actors, shards, lambda a, shard: a.explain.remote(shard, options), writer, progress,
                        "explaining (ray)", on_shard)
    input_rows = len(pairs) + len(rejects)
    rejects += writer.rejected()
    write_rejects(out / "rejects.jsonl", rejects)
    return {**stats, "input_rows": input_rows, "rejected": len(rejects), "rejects_file": str(out / "rejects.jsonl")}


def recommend_all_ray(run: str, gen: GenerateConfig, k: int, out: str | Path, chunk_size: int = 32,
                      options: dict | None = None, workers: int = 1, address: str | None = None, fmt: str = "jsonl",
                      cold_start: str = "item-only", progress: bool = True, on_shard=None,
                      users: list[str] | None = None) -> dict:
    """:func:`~recreason.jobs.batch.recommend_all` on Ray: every known user's top ``k``, as shards of users."""
    import hashlib

    from recreason.data.dataset import Dataset
    from recreason.rundir import Run

    if not 1 <= k <= 1000:
        raise ConfigError(f"-k {k} is out of range; valid: 1 to 1000")
    the_run = Run(run)
    if users is None:  # the users the Predictor knows: those of the training split
        users = sorted({r.user for r in Dataset(the_run.info["dataset"]).subset(the_run.split_seed, "train")})
    job = _job("recommend", the_run.fingerprint(), gen, options, chunk_size, fmt, k=k,
               users=hashlib.sha256("\n".join(users).encode("utf-8", "surrogateescape")).hexdigest())
    writer = ShardWriter(Path(out), job, fmt)
    ray = start_ray(address, workers)
    actors = _actors(ray, run, gen, cold_start, workers)
    shards = [users[n:n + chunk_size] for n in range(0, len(users), chunk_size)]
    return _run_shards(ray, actors, shards, lambda a, shard: a.recommend.remote(shard, k, options), writer, progress,
                       "recommending (ray)", on_shard)


def read_shards(out: str | Path) -> list[dict]:
    """Every row of a finished (or partial) sharded output, in shard order."""
    out = Path(out)
    rows: list[dict] = []
    for path in sorted(out.glob("part-*.*")):
        if path.suffix == ".jsonl":
            rows += [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows += pq.read_table(path).to_pylist()
    return rows
