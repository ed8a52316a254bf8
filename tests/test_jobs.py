"""Batch jobs: reasons for a pairs file and every user's top K, chunked, resumable, with rejects."""

import json
import os
import signal
import subprocess
import sys

import pytest


def _pairs_csv(path, predictor, n=6):
    records = predictor.dataset.subset(1, "test")[:n]
    lines = ["user_id,item_id,history,item_features"]
    lines += [f"{r.user},{r.item},," for r in records]
    lines.insert(3, ",missing-user-id,,")  # file line 4: no user id
    lines.append('newcomer,brand-new-item,,"[""tone"", ""strings""]"')  # an unknown item described by features
    lines.append("someone,no-such-item,,")  # unknown item without features: rejected, not a crash
    path.write_text("\n".join(lines) + "\n")
    return records


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_explain_pairs_writes_every_valid_pair_and_rejects_the_rest(tiny_run, tmp_path, suffix):
    import pyarrow.parquet as pq

    from recreason.config import GenerateConfig
    from recreason.inference import Predictor
    from recreason.jobs import explain_pairs

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=5, precision="fp32"))
    records = _pairs_csv(tmp_path / "pairs.csv", predictor)
    out = tmp_path / f"reasons{suffix}"
    stats = explain_pairs(predictor, tmp_path / "pairs.csv", out, chunk_size=3, progress=False)
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    elif suffix == ".csv":
        import csv

        rows = list(csv.DictReader(out.open()))
        for r in rows:
            r["line"] = int(r["line"])
    else:
        rows = pq.read_table(out).to_pylist()
    assert stats["rows"] == len(rows) == len(records) + 1 and stats["rejected"] == 2
    rejects = [json.loads(line) for line in (tmp_path / f"reasons{suffix}.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], "user_id" in r["reason"] or "unknown item" in r["reason"]) for r in rejects] == \
        [(4, True), (len(records) + 4, True)]  # header + records + the bad row + newcomer, then this one
    assert not (tmp_path / f"reasons{suffix}.journal.jsonl").exists()
    direct = predictor.explain([(r.user, r.item) for r in records])
    assert [r["reason"] for r in rows if r["user_id"] != "newcomer"] == [e.reason for e in direct]
    newcomer = next(r for r in rows if r["user_id"] == "newcomer")
    assert "cold_start_item_only" in str(newcomer["flags"])


_KILLED_JOB = """
import os, signal, sys
from recreason.config import GenerateConfig
from recreason.inference import Predictor
from recreason.jobs import explain_pairs

def kill_after_2(chunk):
    if chunk == 2:  # two chunks are in the journal; the process dies with no cleanup
        os.kill(os.getpid(), signal.SIGKILL)

predictor = Predictor(sys.argv[1], GenerateConfig(max_new_tokens=5, precision="fp32"))
stats = explain_pairs(predictor, sys.argv[2], sys.argv[3], chunk_size=2, progress=False,
                      on_chunk=kill_after_2 if sys.argv[4] == "kill" else None)
print(stats["resumed"], stats["rows"])
"""


def test_a_job_killed_with_sigkill_resumes_without_redoing_or_losing_pairs(tiny_run, tmp_path):
    from recreason.config import GenerateConfig
    from recreason.inference import Predictor

    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=5, precision="fp32"))
    records = predictor.dataset.subset(1, "test")[:9]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"user_id": r.user, "item_id": r.item}) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _KILLED_JOB, str(tiny_run[0]), str(pairs), str(out)]
    killed = subprocess.run(args + ["kill"], capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    journal = (tmp_path / "out.jsonl.journal.jsonl").read_text().splitlines()
    assert len(journal) == 5 and json.loads(journal[0])["job"]["input"] == str(pairs.resolve())  # the job, 2 chunks of 2
    resumed = subprocess.run(args + ["resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.split() == ["4", "9"]  # 4 pairs came from the journal, 5 were new, 9 rows in all
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 10))
    assert [r["reason"] for r in rows] == [e.reason for e in predictor.explain([(r.user, r.item) for r in records])]


def test_recommend_all_users_from_the_command_line(tiny_run, tmp_path, capsys):
    import csv

    from recreason.cli import main
    from recreason.config import GenerateConfig
    from recreason.inference import Predictor

    out = tmp_path / "top.csv"
    args = ["recommend", "--run", str(tiny_run[0]), "--all-users", "-k", "2", "--out", str(out),
            "--set", "generate.max_new_tokens=4", "--set", "generate.precision=fp32", "--quiet"]
    assert main(args) == 0
    assert "reasons/s" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    predictor = Predictor(tiny_run[0], GenerateConfig(max_new_tokens=4, precision="fp32"))
    users = sorted(predictor.prompter.user_profiles)
    assert len(rows) == 2 * len(users) and [r["rank"] for r in rows[:2]] == ["1", "2"]
    first = [r["item_id"] for r in rows if r["user_id"] == users[0]]
    assert first == [item for item, _ in predictor.rank(users[0], 2)]
    assert main(args[:3] + ["--all-users"]) == 2  # no --out: a clear error
    assert "--out" in capsys.readouterr().err
