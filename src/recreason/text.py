"""Word-level tokenization and feature matching shared by the NETE export, prompts, metrics and checks.

PETER, PEPLER and NRT compare explanations as lower-cased word sequences
with punctuation and English clitics split into tokens of their own. Both
the exported ``reviews.pickle`` sentences and every metric go through
:func:`tokenize`, so numbers computed here line up with those codebases.

Chinese has no spaces between words. A run of Han characters is cut into
words by jieba's dictionary segmenter (:func:`tokenize`: words, what feature
matching and the grounding checks count) or into single characters
(:func:`tokenize_chars`: what the headline BLEU/ROUGE of a Chinese data set
count, since they then do not depend on a segmenter's dictionary). Full-width
punctuation is read as its ASCII counterpart first. English text is cut the
same way by both.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Iterable, Sequence

_CLITICS = re.compile(r"(n't|'s|'m|'ve|'re|'d|'ll)\b")
# Runs of punctuation collapse to a single token, as in the reference code.
_PUNCT_RUNS = [
    (re.compile(r",+"), " , "),
    (re.compile(r":+"), " , "),
    (re.compile(r";+"), " . "),
    (re.compile(r"\.+"), " . "),
    (re.compile(r"!+"), " ! "),
    (re.compile(r"\?+"), " ? "),
    (re.compile(r"\("), " ( "),
    (re.compile(r"\)"), " ) "),
    (re.compile(r"\""), " "),
]
_SPACES = re.compile(r"\s+")
# Han characters (CJK unified ideographs, extension A, compatibility ideographs, the supplementary planes).
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_HAN = re.compile(f"[{HAN}]")
_HAN_OR_OTHER = re.compile(f"[{HAN}]|[^{HAN}]+")
_FULL_WIDTH = str.maketrans({"，": ",", "、": ",", "。": ".", "｡": ".", "！": "!", "？": "?", "；": ";", "：": ":",
                             "（": "(", "）": ")", "“": '"', "”": '"', "「": '"', "」": '"', "『": '"', "』": '"',
                             "《": '"', "》": '"', "〈": '"', "〉": '"', "…": ".", "～": " ", "　": " "})


def has_han(text: str) -> bool:
    """Whether ``text`` holds a Han (Chinese) character."""
    return _HAN.search(text) is not None


def han_share(text: str) -> float:
    """Han characters over all letters and digits of ``text`` (0.0 when it has none): how Chinese a text is."""
    letters = [c for c in text if c.isalnum()]
    return sum(1 for c in letters if _HAN.match(c)) / len(letters) if letters else 0.0


_jieba = None


def jieba_module():
    """jieba, imported once with its start-up chatter silenced (it loads its dictionary on first use)."""
    global _jieba
    if _jieba is None:
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _jieba


def normalize(text: str) -> str:
    """Lower-case ``text`` and put spaces around punctuation and clitics."""
    text = text.lower().replace("\u2019", "'").translate(_FULL_WIDTH)
    text = _CLITICS.sub(r" \1", text)
    for pattern, repl in _PUNCT_RUNS:
        text = pattern.sub(repl, text)
    return _SPACES.sub(" ", text).strip()


def tokenize(text: str) -> list[str]:
    """Split ``text`` into the word tokens the metrics count (Chinese cut into words by jieba)."""
    norm = normalize(text)
    if not norm:
        return []
    tokens = norm.split(" ")
    if not _HAN.search(norm):
        return tokens
    jieba = jieba_module()
    out: list[str] = []
    for token in tokens:
        if _HAN.search(token):
            out.extend(w for w in jieba.lcut(token) if w.strip())
        else:
            out.append(token)
    return out


def split_chars(tokens: Sequence[str]) -> list[str]:
    """Tokens with every Han character a token of its own (other words stay whole): cutting words first and
    characters after keeps a length cap in words the same for both."""
    return [piece for token in tokens for piece in (_HAN_OR_OTHER.findall(token) if _HAN.search(token) else [token])]


def tokenize_chars(text: str) -> list[str]:
    """:func:`tokenize` with every Han character a token of its own (other words stay whole)."""
    return split_chars(tokenize(text))


# Closed-class words (prepositions, particles, pronouns, determiners, modals) and a few light verbs. The
# feature vocabulary is built from tokens spaCy tagged as nouns at least ``min_df`` times, and tagging errors
# let some of these in ("to", "on", "in", "out", "go" on the demo data). They describe no aspect of an item,
# so the grounding check and candidate selection ignore them; FMR/FCR keep the vocabulary as PETER does.
FUNCTION_WORDS = frozenset(
    """a an the this that these those some any no none all both each every either neither
    i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
    in on at to of for from by with without into onto out off up down over under about above below across
    along around through between after before behind beyond near since until upon via per than as
    and or but nor so yet if then
    can could may might must shall should will would do does did be is are was were been being have has had
    re ve ll go goes went take takes took give gives gave get gets got make makes made much many more most
    less least few several such own same other another""".split()
)


def is_content_feature(feature: str) -> bool:
    """False for a vocabulary entry made only of function words (a tagging error, not an aspect)."""
    return not all(word in FUNCTION_WORDS for word in feature.split())


class FeatureMatcher:
    """Finds vocabulary features in token lists; multi-word features match when their words appear in order."""

    def __init__(self, features: Iterable[str]):
        self.features = sorted(set(features))
        self._by_first: dict[str, list[tuple[str, ...]]] = collections.defaultdict(list)
        for feature in self.features:
            words = tuple(feature.split())
            if words:
                self._by_first[words[0]].append(words)

    def find(self, tokens: Sequence[str]) -> set[str]:
        found = set()
        for i, tok in enumerate(tokens):
            for words in self._by_first.get(tok, ()):
                if tuple(tokens[i : i + len(words)]) == words:
                    found.add(" ".join(words))
        return found


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def ngram_counts(tokens: Sequence[str], max_order: int) -> collections.Counter:
    """Every n-gram of orders 1..``max_order`` in ``tokens``, as tuples, with its count."""
    counts: collections.Counter = collections.Counter()
    for order in range(1, max_order + 1):
        for i in range(len(tokens) - order + 1):
            counts[tuple(tokens[i : i + order])] += 1
    return counts


def ngram_matches(first: collections.Counter, second: collections.Counter, max_order: int) -> list[int]:
    """Clipped n-gram matches of two :func:`ngram_counts`, per order 1..``max_order`` (symmetric: the same
    whichever is the reference)."""
    matches = [0] * max_order
    for ngram, count in (first & second).items():
        matches[len(ngram) - 1] += count
    return matches


def sentence_bleu_from_matches(matches: Sequence[int], reference_length: int, hypothesis_length: int) -> float:
    """:func:`sentence_bleu` from the pair's :func:`ngram_matches` and lengths (a caller comparing many pairs
    counts the matches of each unordered pair once and reads both directions off them)."""
    if not reference_length and not hypothesis_length:
        return 1.0
    if not reference_length or not hypothesis_length or not matches[0]:
        return 0.0
    log_precision = 0.0
    for order, matched in enumerate(matches, start=1):
        possible = max(0, hypothesis_length - order + 1)
        smooth = 0 if order == 1 else 1
        log_precision += math.log((matched + smooth) / (possible + smooth))
    brevity = min(0.0, 1.0 - reference_length / hypothesis_length)
    return math.exp(log_precision / len(matches) + brevity)


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str], max_order: int = 4) -> float:
    """BLEU of one hypothesis against one reference, in [0, 1], with add-one smoothing of the n-gram
    precisions above unigrams ("BLEU+1", Lin & Och 2004), so that a pair sharing no 4-gram still scores by
    what it shares; brevity penalty as in corpus BLEU. Two empty lists are equal (1.0), one empty 0.0."""
    matches = ngram_matches(ngram_counts(reference, max_order), ngram_counts(hypothesis, max_order), max_order)
    return sentence_bleu_from_matches(matches, len(reference), len(hypothesis))


def lcs_f1(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists (beta = 1), in [0, 1]; two empty lists are equal (1.0)."""
    if not a and not b:
        return 1.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))
