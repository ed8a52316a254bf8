"""Hostile input: broken review logs, hostile HTTP requests and damaged run directories.

The corpus is generated here, one case per kind of damage. For every reading case the records are
accounted for (read + rejected == records in the file) and each bad one is rejected with its line and a
reason; a file that cannot be read at all is one clear DataError. Nothing raises anything else.
"""

import gzip
import json

import pytest

from conftest import write_jsonl
from recreason.data.readers import read_reviews
from recreason.errors import DataError


def good(n: int, user: str = "u") -> dict:
    return {"reviewerID": f"{user}{n}", "asin": f"i{n % 7}", "overall": 5.0, "reviewText": f"Great tone number {n}.",
            "unixReviewTime": 1_300_000_000 + n, "summary": "ok"}


def corpus() -> dict[str, tuple[bytes, int, str]]:
    """name -> (file bytes, line of the bad record, words the reject reason must contain)."""
    lines = [json.dumps(good(n)).encode() for n in range(10)]

    def with_bad(bad: bytes, at: int = 4) -> bytes:
        return b"\n".join(lines[: at - 1] + [bad] + lines[at - 1:]) + b"\n"

    deep = b'{"reviewerID": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return {
        "invalid utf-8": (with_bad(json.dumps(good(99)).encode().replace(b"Great", b"Gr\xff\xfeat")), 4, "UTF-8"),
        "5001-digit number": (with_bad(b'{"reviewerID": "x", "overall": ' + b"9" * 5001 + b"}"), 4, "malformed"),
        "1 MB review": (with_bad(json.dumps({**good(99), "reviewText": "a" * 1_000_500}).encode()), 4, "bytes"),
        "long review": (with_bad(json.dumps({**good(99), "reviewText": "word " * 5000}).encode()), 4, "max_review_chars"),
        "lone surrogate": (with_bad(json.dumps({**good(99), "reviewText": "bad \ud800 text"}).encode()), 4, "surrogate"),
        "deep nesting": (with_bad(deep), 4, "nested"),
        "timestamp 1e309": (with_bad(json.dumps({**good(99), "unixReviewTime": "1e309"}).encode()), 4, "time"),
        "timestamp 1e20": (with_bad(json.dumps({**good(99), "unixReviewTime": 1e20}).encode()), 4, "max_timestamp"),
        "long id": (with_bad(json.dumps({**good(99), "reviewerID": "u" * 500}).encode()), 4, "max_id_chars"),
    }


@pytest.mark.parametrize("case", list(corpus()))
def test_every_broken_jsonl_record_is_rejected_with_its_line(case, tmp_path):
    data, line, words = corpus()[case]
    path = tmp_path / "reviews.jsonl"
    path.write_bytes(data)
    result = read_reviews(path)
    assert len(result.reviews) == 10 and result.total == 11
    assert [r.line for r in result.rejects] == [line]
    assert words.lower() in result.rejects[0].reason.lower(), result.rejects[0].reason


def test_a_bom_and_a_bare_cr_inside_a_record_are_read(tmp_path):
    rows = [json.dumps(good(n)) for n in range(4)]
    rows[2] = json.dumps({**good(2), "reviewText": "line one\rline two"}).replace("\\r", "\r")
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")
    result = read_reviews(path)
    assert len(result.reviews) == 4 and not result.rejects
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfuser_id,item_id,rating,text,timestamp\nu1,i1,5,nice tone,100\n")
    assert len(read_reviews(csv_path).reviews) == 1


def test_an_unclosed_csv_quote_costs_one_row_reported_at_its_first_line(tmp_path):
    header = "user_id,item_id,rating,text,timestamp"
    rows = [f"u{n},i{n % 5},5,fine strings {n},{100 + n}" for n in range(40)]
    rows[10] = 'u10,i0,5,"this quote never closes,110'
    rows[20] = 'u20,i0,5,"a quoted field\nspanning two lines",120'  # legitimate: one row on lines 22-23
    path = tmp_path / "r.csv"
    path.write_text("\n".join([header] + rows) + "\n")
    result = read_reviews(path)
    assert result.total == 40 and len(result.reviews) == 39
    assert [(r.line, "quote is never closed" in r.reason) for r in result.rejects] == [(12, True)]
    assert any(r.text.startswith("a quoted field") and r.line == 22 for r in result.reviews)
    huge = tmp_path / "huge.csv"  # a field over csv's default 128 KiB limit
    huge.write_text(header + "\nu1,i1,5,ok,1\nu2,i2,5," + "x" * 200_000 + ",2\nu3,i3,5,ok,3\n")
    result = read_reviews(huge)
    assert len(result.reviews) == 2 and [r.line for r in result.rejects] == [3]


def test_damaged_gzip_directories_and_bad_out_paths(tmp_path, real_lines):
    data = "".join(real_lines[:40]).encode()
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    result = read_reviews(truncated, max_reject_fraction=1.0)
    assert result.reviews and result.rejects[-1].reason.startswith("the file ends early")
    assert len(result.reviews) + len(result.rejects) == result.total
    fake = tmp_path / "plain.jsonl.gz"
    fake.write_bytes(data)
    with pytest.raises(DataError, match="cannot be read"):
        read_reviews(fake)
    with pytest.raises(DataError, match="is a directory"):
        read_reviews(tmp_path)


def test_prepare_never_leaves_a_half_written_dataset_and_accounts_for_every_record(real_lines, tmp_path, capsys):
    from recreason.cli import main

    src = write_jsonl(tmp_path / "reviews.jsonl", real_lines[:120] + ['{"broken\n', "\xff\n"])
    out = tmp_path / "ds"
    args = ["prepare", str(src), "--out", str(out), "--quiet", "--set", "prepare.min_feature_df=3"]
    assert main(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["explained"] + stats["skipped_no_explanation"] + stats["rejected"] + stats["unused"] == \
        stats["input_records"] == 122
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{nope\n"] * 10)
    assert main(["prepare", str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "10 of 10 records are bad" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the old dataset, untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds-")]  # no temporary folder left
    file_out = tmp_path / "a-file"
    file_out.write_text("x")
    assert main(["prepare", str(src), "--out", str(file_out), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.fixture
def damaged_run(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run, ignore=shutil.ignore_patterns("generated", "eval*"))
    return run


@pytest.mark.parametrize("damage,file", [
    ("truncate", "best/adapter_model.safetensors"),
    ("empty", "best/adapter_model.safetensors"),
    ("truncate", "run.json"),
    ("truncate", "best/adapter_config.json"),
])
def test_a_damaged_run_is_one_line_naming_the_file(damaged_run, damage, file, capsys):
    from recreason.cli import main

    path = damaged_run / file
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[: len(path.read_bytes()) // 2])
    assert main(["generate", "--run", str(damaged_run), "--max-records", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err


def test_resume_fails_loudly_on_a_missing_or_damaged_checkpoint(damaged_run, prepared_dir, tiny_model_dir, capsys):
    import shutil

    from recreason.cli import main

    args = ["train", str(prepared_dir), "--out", str(damaged_run), "--quiet", "--model", str(tiny_model_dir),
            "--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "train.max_eval_records=8",
            "--set", "train.precision=fp32", "--set", "train.batch_size=8"]
    (damaged_run / "last" / "state.pt").write_bytes(b"not a checkpoint")
    assert main(args + ["--resume"]) == 2
    assert "state.pt is damaged" in capsys.readouterr().err
    (damaged_run / "last" / "state.pt").unlink()
    assert main(args + ["--resume"]) == 2
    assert "state.pt is missing" in capsys.readouterr().err
    shutil.rmtree(damaged_run / "last")
    assert main(args + ["--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(args + ["--resume-or-start"]) == 0  # the explicit flag starts fresh
    assert (damaged_run / "last" / "state.pt").exists()
