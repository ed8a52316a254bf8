import json
import pickle

import pytest

from conftest import write_jsonl
from recreason.data.dataset import Dataset, prepare
from recreason.data.nete import export_nete, read_nete
from recreason.data.readers import read_reviews
from recreason.data.records import DataError
from recreason.data.split import split_indices
from recreason.text import normalize


def test_amazon_dump_reads_real_lines(real_lines, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", real_lines[:50])
    result = read_reviews(path)
    assert result.schema == "amazon" and result.total == 50
    first = json.loads(real_lines[0])
    r = result.reviews[0]
    assert (r.user_id, r.item_id, r.rating, r.timestamp) == (
        first["reviewerID"], first["asin"], first["overall"], first["unixReviewTime"])
    assert r.summary == first["summary"] and r.line == 1


def test_bad_records_are_rejected_with_line_and_reason(real_lines, tmp_path):
    good = real_lines[:20]
    dup = real_lines[3]
    bad_rating = json.loads(real_lines[5]); bad_rating["overall"] = 7; bad_rating["unixReviewTime"] += 1
    no_text = json.loads(real_lines[6]); no_text["reviewText"] = "  "; no_text["unixReviewTime"] += 1
    wrong_type = json.loads(real_lines[7]); wrong_type["overall"] = "five"; wrong_type["unixReviewTime"] += 1
    missing = json.loads(real_lines[8]); del missing["asin"]
    rows = good + ["{not json\n", dup, json.dumps(bad_rating), json.dumps(no_text), json.dumps(wrong_type), json.dumps(missing)]
    result = read_reviews(write_jsonl(tmp_path / "r.jsonl", rows))
    assert len(result.reviews) == 20
    reasons = {r.line: r.reason for r in result.rejects}
    assert reasons[21].startswith("malformed JSON")
    assert reasons[22] == "duplicate of line 4: same user, item and time"
    assert "'overall' is 7" in reasons[23] and "outside the rating range" in reasons[23]
    assert reasons[24] == "field 'reviewText' is empty"
    assert "'overall' must be a number" in reasons[25]
    assert reasons[26] == "field 'asin' is missing"


def test_mostly_bad_file_fails_clearly(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", ["{bad\n"] * 5 + [json.dumps({"user_id": "u", "item_id": "i", "rating": 5,
                                                                           "text": "ok", "timestamp": 1})])
    with pytest.raises(DataError, match="5 of 6 records are bad"):
        read_reviews(path)


def test_generic_csv_schema(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(
        "user_id,item_id,rating,text,timestamp,summary,attributes\n"
        'u1,i1,4,"Great tone, bright strings.",2024-01-02T00:00:00,Nice,"{""brand"": ""Ernie Ball""}"\n'
        "u2,i1,9,Too loud.,1700000000,,\n"
    )
    result = read_reviews(path)
    assert result.schema == "generic"
    assert result.reviews[0].attributes == {"brand": "Ernie Ball"} and result.reviews[0].rating == 4.0
    assert result.reviews[0].timestamp == 1704153600
    assert [(r.line, r.reason.split(",")[0]) for r in result.rejects] == [(3, "field 'rating' is 9")]


def test_split_is_reproducible_and_keeps_users_items_in_train():
    import random

    rng = random.Random(0)
    users = [f"u{rng.randint(0, 60)}" for _ in range(1000)]
    items = [f"i{rng.randint(0, 80)}" for _ in range(1000)]
    a = split_indices(users, items, seed=1)
    assert a == split_indices(users, items, seed=1)
    assert a != split_indices(users, items, seed=2)
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (800, 100, 100)
    all_idx = a["train"] + a["validation"] + a["test"]
    assert sorted(all_idx) == list(range(1000))
    assert {users[i] for i in a["train"]} == set(users)
    assert {items[i] for i in a["train"]} == set(items)



def test_temporal_split_tests_on_the_latest_reviews_and_keeps_first_reviews_in_train():
    # Ten records, one per day; u9 and i9 appear only on the last day, so that record must stay in training.
    users = ["u0", "u1", "u0", "u1", "u0", "u1", "u0", "u1", "u0", "u9"]
    items = ["i0", "i1", "i1", "i0", "i0", "i1", "i0", "i1", "i1", "i9"]
    days = [86400 * d for d in (3, 0, 1, 2, 4, 5, 6, 7, 8, 9)]  # record 0 is the third day, record 1 the first
    parts = split_indices(users, items, seed=1, ratios=(0.6, 0.2, 0.2), timestamps=days)
    # In time order: 1 (u1,i1) 2 (u0,i1) 3 (u1,i0) 0 (u0,i0) 4 5 6 7 8 9 (u9,i9, first of both).
    # First-of-user/item: 1, 2, 3, 9; filled in time order to 6: + 0, 4; validation 5, 6; test 7, 8.
    assert parts == {"train": [0, 1, 2, 3, 4, 9], "validation": [5, 6], "test": [7, 8]}
    # Equal timestamps: the seed decides the order among them, and the same seed the same split.
    same_day = [0] * 10
    a = split_indices(users, items, seed=1, ratios=(0.6, 0.2, 0.2), timestamps=same_day)
    assert a == split_indices(users, items, seed=1, ratios=(0.6, 0.2, 0.2), timestamps=same_day)
    assert a == split_indices(users, items, seed=1, ratios=(0.6, 0.2, 0.2))
    with pytest.raises(ValueError, match="one value per record"):
        split_indices(users, items, seed=1, timestamps=days[:3])


def test_prepare_refuses_an_unknown_split_method(tmp_path):
    from recreason.config import PrepareConfig
    from recreason.errors import ConfigError

    with pytest.raises(ConfigError, match="prepare.split must be one of random, temporal, got 'by-time'"):
        prepare(tmp_path / "missing.jsonl", tmp_path / "ds", PrepareConfig(split="by-time"), progress=False)
    assert not (tmp_path / "ds").exists()

def test_prepare_real_reviews(prepared_dir):
    ds = Dataset(prepared_dir)
    stats = ds.stats
    assert stats["input_records"] == 600
    assert stats["explained"] + stats["skipped_no_explanation"] == stats["valid"]
    assert stats["explained"] > 450
    for r in ds.records[:50]:
        assert r.feature in ds.features
        assert r.feature in r.sentence.lower()
        assert 4 <= len([w for w in r.sentence.split() if any(c.isalnum() for c in w)]) <= 30
        assert r.sentiment in (1, -1)
    split = ds.split(1)
    assert set(split["train"]).isdisjoint(split["test"])
    assert ds.split(2) != split


def test_extraction_on_known_sentences():
    from recreason.data.extract import ExtractConfig, extract
    from recreason.data.records import Review

    texts = [
        "I bought it last week. The tone is bright and the strings feel smooth.",
        "The strings were cheap. Shipping took forever.",
        "Nice tone on this amp, and the price is great for beginners like me.",
    ] * 4
    reviews = [Review(f"u{i}", "i", 5.0, t, i) for i, t in enumerate(texts)]
    explained, skipped, vocab = extract(reviews, ExtractConfig(min_df=2), progress=False)
    assert {"tone", "strings", "price"} <= set(vocab)
    first = explained[0]
    assert first.sentence == "The tone is bright and the strings feel smooth."
    assert (first.feature, first.opinion) == ("tone", "bright")
    assert explained[1].feature == "strings" and explained[1].opinion == "cheap"


def test_nete_export_roundtrip_and_safe_reader(prepared_dir, tmp_path):
    ds = Dataset(prepared_dir)
    path = export_nete(ds, tmp_path / "nete")
    rows = read_nete(path)
    assert len(rows) == len(ds.records)
    feature, opinion, sentence, sentiment = rows[0]["template"]
    assert feature == ds.records[0].feature and sentiment in (1, -1)
    assert sentence == normalize(ds.records[0].sentence)
    train = (tmp_path / "nete" / "1" / "train.index").read_text().split()
    assert [int(x) for x in train] == ds.split(1)["train"]
    assert (tmp_path / "nete" / "2" / "test.index").exists()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pickle"
    evil.write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DataError, match="refusing to load"):
        read_nete(evil)
