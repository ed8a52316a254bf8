"""Hostile input on the newer surfaces: batch jobs, the safety template, the server's Host check, export and serve
arguments, and the reader's edges. One test per finding; each fails without its fix. (Config values: test_config.py.)
"""

import json
import os
import subprocess
import sys

import pytest

from recreason.errors import ConfigError, DataError


def _pairs(records, n: int) -> list[dict]:
    return [{"user_id": r.user, "item_id": r.item} for r in records[:n]]


@pytest.fixture(scope="module")
def predictor(tiny_run):
    from recreason.config import GenerateConfig
    from recreason.inference import Predictor

    return Predictor(tiny_run[0], GenerateConfig(max_new_tokens=4, precision="fp32", batch_size=8))


# ----- 1. memory: the API's limits hold for batch jobs, under a real address-space cap -----------------------
_CAPPED_JOB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
from recreason.cli import main
sys.exit(main(["explain", "--run", sys.argv[1], "--pairs", sys.argv[2], "--out", sys.argv[3], "--quiet",
               "--set", "generate.max_new_tokens=4", "--set", "generate.precision=fp32"]))
"""


def test_huge_item_features_in_a_pairs_file_are_rejected_under_a_memory_cap(tiny_run, predictor, tmp_path):
    records = predictor.dataset.subset(1, "test")
    rows = _pairs(records, 2) + [{"user_id": "newcomer", "item_id": "new-item", "item_features": ["x" * 9000] * 3}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-c", _CAPPED_JOB, str(tiny_run[0]), str(pairs), str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-1500:]
    assert len(out.read_text().splitlines()) == 2
    rejects = [json.loads(x) for x in (tmp_path / "out.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [3] and "item_features" in rejects[0]["reason"]


# ----- 2. the safety filter never hands back what it filtered ------------------------------------------------
@pytest.mark.parametrize("features, leaked", [
    (["shit", "fucking shit"], ["shit", "fucking"]),
    (["visit www.evil-example.com now"] * 8, ["evil-example", "www."]),
    (["mail me at bob@example.org", "tone"], ["bob@", "example.org"]),
])
def test_the_replacement_template_never_names_a_filtered_feature(features, leaked):
    from recreason.inference.safety import ReasonChecker

    checked = ReasonChecker(["tone"]).check("Great " + " ".join(features), features)
    assert checked.replaced
    assert not any(word in checked.text.lower() for word in leaked), checked.text
    assert not any(word in " ".join(checked.features).lower() for word in leaked)


def test_the_api_answers_an_unknown_item_with_profane_features_without_them(tiny_run, tmp_path):
    from fastapi.testclient import TestClient

    from recreason.config import GenerateConfig
    from recreason.serving.app import create_app
    from recreason.serving.service import ExplanationService

    service = ExplanationService(tiny_run[0], store_url=f"sqlite:///{tmp_path / 's.db'}",
                                 gen_cfg=GenerateConfig(max_new_tokens=4, precision="fp32"))
    try:
        client = TestClient(create_app(service))
        user = next(iter(service.predictor.prompter.user_profiles))
        for features in (["shit", "fucking shit"], ["visit www.evil-example.com now"] * 8):
            body = {"items": [{"user_id": user, "item_id": "brand-new", "item_features": features}]}
            answer = client.post("/v1/explanations", json=body)
            assert answer.status_code == 200
            reason = answer.json()["explanations"][0]["reason"].lower()
            assert "shit" not in reason and "evil-example" not in reason, reason
    finally:
        service.close()


# ----- 3. a leftover journal of another job is refused, never mixed in ---------------------------------------
def test_a_journal_of_another_job_is_refused_naming_what_differs(predictor, tmp_path):
    from recreason.jobs import explain_pairs

    records = predictor.dataset.subset(1, "test")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in _pairs(records, 4)))
    b.write_text("".join(json.dumps(r) + "\n" for r in _pairs(records[4:], 4)))
    out = tmp_path / "mix.jsonl"

    def stop(chunk):
        if chunk == 1:
            raise KeyboardInterrupt  # killed after the first chunk: the journal stays
    with pytest.raises(KeyboardInterrupt):
        explain_pairs(predictor, a, out, chunk_size=2, progress=False, on_chunk=stop)
    with pytest.raises(ConfigError, match="journal of another job.*input"):
        explain_pairs(predictor, b, out, chunk_size=2, progress=False)
    assert not out.exists()
    stats = explain_pairs(predictor, a, out, chunk_size=2, progress=False)  # the same job resumes
    assert stats["resumed"] == 2 and stats["rows"] == 4


# ----- 4, 5. every pairs row accounted for: stray quotes, huge fields, invalid UTF-8 ids, duplicates ----------
def test_pairs_rows_are_never_dropped_and_bad_ones_are_rejected_with_their_line(predictor, tmp_path):
    from recreason.jobs import read_pairs

    records = predictor.dataset.subset(1, "test")
    good = [f"{r.user},{r.item}" for r in records[:30]]
    lines = ["user_id,item_id"] + good[:3] + ['"stray,quote'] + good[3:23] + ["big," + "x" * 200_000] + good[23:]
    path = tmp_path / "pairs.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"AKS\xffZ4G1AXYFC,item\n")
    pairs, rejects = read_pairs(path)
    assert len(pairs) + len(rejects) == len(lines) - 1 + 1  # every row but the header, and the bad-UTF-8 one
    assert [p.user for p in pairs] == [r.user for r in records[:30]]
    assert sorted(r["line"] for r in rejects) == [5, 26, 34]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(b'{"user_id": "AKS\xffZ4G1AXYFC", "item_id": "i"}\n' + json.dumps(_pairs(records, 1)[0]).encode()
                      + b"\n")
    pairs, rejects = read_pairs(jsonl)
    assert len(pairs) == 1 and rejects[0]["line"] == 1 and "UTF-8" in rejects[0]["reason"]


def test_identical_pairs_are_decoded_once_and_every_row_is_written(predictor, tmp_path, monkeypatch):
    from recreason.jobs import explain_pairs

    records = predictor.dataset.subset(1, "test")
    rows = _pairs(records, 2) * 50
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    decoded = []
    real = predictor.generate
    monkeypatch.setattr(predictor, "generate", lambda prompted, *a, **k: decoded.extend(prompted) or real(prompted, *a, **k))
    stats = explain_pairs(predictor, pairs, tmp_path / "out.jsonl", chunk_size=16, progress=False)
    assert len(decoded) == 2 and stats["rows"] == 100 and stats["input_rows"] == 100 and stats["decoded"] == 2
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in out] == list(range(1, 101)) and len({r["reason"] for r in out[::2]}) == 1


# ----- 7, 8. values and paths refused up front, in one line ------------------------------------------------
def test_job_arguments_and_paths_are_checked_before_any_work(predictor, tiny_run, tmp_path, capsys):
    from recreason.cli import main
    from recreason.jobs import explain_pairs, recommend_all, read_pairs

    records = predictor.dataset.subset(1, "test")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in _pairs(records, 2)))
    garbage = tmp_path / "pairs.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="cannot be read as Parquet"):
        read_pairs(garbage)
    folder = tmp_path / "a-folder.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="is a directory"):
        read_pairs(folder)
    nested = tmp_path / "not" / "yet" / "there.jsonl"  # a missing folder is made, not a traceback after a chunk
    assert explain_pairs(predictor, pairs, nested, progress=False)["rows"] == 2 and nested.exists()
    for k in (0, -1, 10**9):
        with pytest.raises(ConfigError, match="-k"):
            recommend_all(predictor, k, tmp_path / "top.jsonl", progress=False)
        with pytest.raises(SystemExit):
            main(["recommend", "--run", str(tiny_run[0]), "--all-users", "-k", str(k), "--out", str(tmp_path / "t.jsonl")])
    for flags in (["serve", "--run", str(tiny_run[0]), "--max-batch-size", "0"],
                  ["serve", "--run", str(tiny_run[0]), "--port", "70000"]):
        with pytest.raises(SystemExit):
            main(flags)
    assert "out of range" in capsys.readouterr().err


def test_serve_refuses_a_store_it_cannot_open_before_starting(tiny_run, tmp_path, capsys):
    import time

    from recreason.cli import main

    run = str(tiny_run[0])
    assert main(["serve", "--run", run, "--store", str(tmp_path / "missing" / "s.db")]) == 2
    start = time.monotonic()
    assert main(["serve", "--run", run, "--store", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert "does not exist" in err and "cannot reach the PostgreSQL server" in err


def test_gguf_export_refuses_bad_targets_before_merging(tiny_run, tmp_path, capsys):
    from recreason.cli import main
    from recreason.models.registry import ALIASES

    reference = str(ALIASES["smollm2-135m"].locate())
    folder = tmp_path / "existing"
    folder.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    not_gguf = tmp_path / "tok.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    run = str(tiny_run[0])
    for out, tok, words in ((folder, reference, "is a folder"), (a_file / "x.gguf", reference, "is a file"),
                            (tmp_path / "m.gguf", str(not_gguf), "not a GGUF file")):
        assert main(["export", run, "--format", "gguf", "--out", str(out), "--tokenizer-gguf", tok]) == 2
        assert words in capsys.readouterr().err
    assert not list(tmp_path.rglob(".*.tmp"))


# ----- 6. DNS rebinding: a Host allow-list, and /healthz says which model, not where ---------------------------
def test_the_server_answers_only_the_hosts_it_serves(tiny_run, tmp_path):
    from fastapi.testclient import TestClient

    from recreason.config import GenerateConfig
    from recreason.serving.app import LOOPBACK_HOSTS, create_app, host_name
    from recreason.serving.service import ExplanationService

    assert [host_name(h) for h in ("127.0.0.1:8000", "[::1]:8000", "LOCALHOST.", "attacker.example")] == \
        ["127.0.0.1", "::1", "localhost", "attacker.example"]
    service = ExplanationService(tiny_run[0], store_url=f"sqlite:///{tmp_path / 's.db'}",
                                 gen_cfg=GenerateConfig(max_new_tokens=4, precision="fp32"))
    try:
        app = create_app(service, allowed_hosts=LOOPBACK_HOSTS)
        hostile = TestClient(app, base_url="http://attacker.example")
        assert hostile.get("/v1/users").status_code == 400
        body = {"user_id": "u", "item_id": "i", "rating": 5.0, "text": "Great tone.", "timestamp": 1}
        assert hostile.post("/v1/interactions", json=body).status_code == 400
        local = TestClient(app, base_url="http://127.0.0.1:8000")
        assert local.get("/v1/users").status_code == 200
        health = local.get("/healthz").json()
        assert health["status"] == "ok" and str(tiny_run[0].name) not in json.dumps(health)
    finally:
        service.close()


# ----- 9. the reader's edges ---------------------------------------------------------------------------------
def test_a_cr_only_file_is_read_and_a_raw_control_byte_is_rejected(tmp_path):
    from recreason.data.readers import read_reviews

    rows = [{"reviewerID": f"u{n}", "asin": f"i{n % 5}", "overall": 5.0, "reviewText": f"Great tone number {n}.",
             "unixReviewTime": 1_300_000_000 + n, "summary": "ok"} for n in range(40)]
    cr = tmp_path / "cr.jsonl"
    cr.write_bytes(b"\r".join(json.dumps(r).encode() for r in rows) + b"\r")
    result = read_reviews(cr)
    assert len(result.reviews) == 40 and not result.rejects
    control = tmp_path / "control.jsonl"
    lines = [json.dumps(r).encode() for r in rows[:5]]
    lines[2] = lines[2].replace(b"Great", b"Gr\x01eat")
    control.write_bytes(b"\n".join(lines) + b"\n")
    result = read_reviews(control)
    assert len(result.reviews) == 4 and result.rejects[0].line == 3 and "0x01" in result.rejects[0].reason
