"""Checks on every generated reason: safety filter and grounding.

* ``profanity``: words from the ``better-profanity`` list (with its leetspeak variants);
* ``personal_data``: e-mail addresses, phone numbers, URLs;
* ``not_a_reason``: empty, a token repeated over and over, or an echo of the prompt;
* ``ungrounded``: the reason names features that are not among the item's known features
  (from its reviews or attributes).

A reason flagged by the first three is replaced by a template built from the item's known features;
``ungrounded`` is reported but the text is kept.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Iterable

from recreason.text import FeatureMatcher, has_han, is_content_feature, tokenize

EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")
PHONE = re.compile(r"(?<!\w)(?:\+?\d[\d\s().-]{7,}\d)(?!\w)")
URL = re.compile(r"\b(?:https?://|www\.)\S+|\b[\w-]+\.(?:com|net|org|io|co)\b", re.I)
REPLACE_FLAGS = ("profanity", "personal_data", "not_a_reason")


@dataclass
class Checked:
    text: str
    flags: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    replaced: bool = False


def profanity_filter():
    """``better-profanity``'s filter with its word list loaded (once), its word set matched as regular expressions
    (:class:`WordPatterns`)."""
    from better_profanity import profanity

    if not getattr(profanity_filter, "loaded", False):
        profanity.load_censor_words()
        words = [str(w) for w in profanity.CENSOR_WORDSET]
        if all(len(c) == 1 for chars in profanity.CHARS_MAPPING.values() for c in chars):
            profanity.CENSOR_WORDSET = WordPatterns(words, profanity.CHARS_MAPPING)
        profanity_filter.loaded = True
    return profanity


class WordPatterns:
    """``better-profanity``'s word set with the same membership, in C: the library keeps a list of ``VaryingString``
    and tests ``word in it`` by comparing the word with each of its 900 entries in Python, character by character
    with their leetspeak alternatives (``a`` is also ``@``, ``4`` or ``*``). Where every alternative is one character
    (the library's own mapping), an entry matches a word exactly when the word has its length and each character is
    one of the entry's alternatives at that place: a regular expression of character classes. The entries are
    compiled per length into one alternation each, and ``word in patterns`` is one ``fullmatch`` (tested equal to
    the library's list on its own words, their variants and ordinary text). A served batch of 16 reasons spent
    about 0.2 s in the library's comparisons between two batches, with the model idle."""

    def __init__(self, words: Iterable[str], char_map: dict[str, tuple[str, ...]]):
        by_length: dict[int, list[str]] = {}
        for word in words:
            pattern = "".join("[" + "".join(re.escape(c) for c in char_map.get(ch, (ch,))) + "]" for ch in word)
            by_length.setdefault(len(word), []).append(pattern)
        self.patterns = {n: re.compile("|".join(patterns)) for n, patterns in by_length.items()}

    def __contains__(self, word) -> bool:
        pattern = self.patterns.get(len(word)) if isinstance(word, str) else None
        return pattern is not None and pattern.fullmatch(word) is not None

    def __bool__(self) -> bool:  # the library reloads its list when the set is empty
        return bool(self.patterns)


@functools.lru_cache(maxsize=65536)
def is_profane(text: str) -> bool:
    """``better-profanity``'s check (its word splitting, with :class:`WordPatterns` for its word set), remembered
    per text: a run repeats many of its reasons, as do the weight settings a tuning scores from one set of
    candidates."""
    return profanity_filter().contains_profanity(text)


FALLBACK = "Recommended because it matches what you have liked before."
FALLBACK_ZH = "推荐给你，因为它和你以前喜欢的相似。"


def template(item_features: list[str], chinese: bool = False) -> str:
    """The replacement of a filtered reason, from the item's features (in Chinese for a Chinese log)."""
    if not item_features:
        return FALLBACK_ZH if chinese else FALLBACK
    shown = item_features[:2]
    if chinese:
        return f"推荐给你，因为其他人常提到它的{'和'.join(shown)}。"
    return f"Recommended for its {' and '.join(shown)}, which other buyers mention."


def unsafe(text: str) -> bool:
    """Whether ``text`` would be filtered as profanity or personal data (a template may not say it either)."""
    return is_profane(text) or bool(EMAIL.search(text) or PHONE.search(text) or URL.search(text))


class ReasonChecker:
    def __init__(self, vocabulary: Iterable[str]):
        self.matcher = FeatureMatcher(vocabulary)

    def check(self, text: str, item_features: list[str], prompt: str = "", highlight: list[str] | None = None) -> Checked:
        """Flag ``text``; ``item_features`` are all the item's known features, ``highlight`` the ones a
        replacement template should name first (default: ``item_features`` in order)."""
        flags = []
        tokens = tokenize(text)
        words = [t for t in tokens if t.isalnum()]
        if is_profane(text):
            flags.append("profanity")
        if EMAIL.search(text) or PHONE.search(text) or URL.search(text):
            flags.append("personal_data")
        if len(words) < 3 or (len(words) >= 6 and len(set(words)) <= len(words) // 3) or \
                (prompt and len(text) > 20 and text.strip() in prompt):
            flags.append("not_a_reason")
        mentioned = sorted(f for f in self.matcher.find(tokens) if is_content_feature(f))
        known = set(item_features)
        if any(f not in known for f in mentioned):
            flags.append("ungrounded")
        if any(f in REPLACE_FLAGS for f in flags):
            # the template names only features that pass the filter themselves: a caller's item_features can be
            # the very text that was filtered ("visit www.evil-example.com"), and must not come back through it
            shown = [f for f in (highlight or item_features) if not unsafe(f)][:2]
            chinese = has_han(text) or any(has_han(f) for f in shown)
            replacement = template(shown, chinese)
            if unsafe(replacement):  # words that pass alone can still meet across the joint
                shown, replacement = [], FALLBACK_ZH if chinese else FALLBACK
            return Checked(replacement, flags, shown, replaced=True)
        return Checked(text, flags, mentioned)
