"""Choose, don't just decode: pick one reason among several candidates by a documented score.

For a candidate c of pair (user u, item i)::

    score(c) = weight_likelihood  * mean token log-probability of c under the model
             + weight_grounded    * min(2, features c names that i has)
             - weight_ungrounded  * features c names that i lacks
             + weight_user        * [c names one of u's own features]
             - weight_generic     * log(1 + how often the run's greedy reason is c for other pairs)

The last term uses a table of the run's own greedy reasons on validation records (what it says for
"everyone"), so a sentence the run produces for many pairs loses to a specific one unless it is much
more likely. The weights are ``generate.weight_*`` keys, tuned on the validation split.
"""

from __future__ import annotations

import collections
import math
from typing import Iterable, Sequence

from recreason.config import GenerateConfig
from recreason.generation.generate import Candidate
from recreason.text import FeatureMatcher, normalize, tokenize


def sentence_key(text: str) -> str:
    """What counts as "the same sentence" for the generic table: the normalized token string."""
    return normalize(text)


def generic_table(texts: Iterable[str]) -> collections.Counter:
    return collections.Counter(sentence_key(t) for t in texts if t.strip())


def candidate_score(candidate: Candidate, item_features: set[str], user_features: set[str], generic: collections.Counter,
                    cfg: GenerateConfig, matcher: FeatureMatcher) -> float:
    named = matcher.find(tokenize(candidate.text))
    grounded = len(named & item_features)
    ungrounded = len(named - item_features)
    return (cfg.weight_likelihood * candidate.logprob
            + cfg.weight_grounded * min(2, grounded)
            - cfg.weight_ungrounded * ungrounded
            + cfg.weight_user * bool(named & user_features)
            - cfg.weight_generic * math.log1p(generic.get(sentence_key(candidate.text), 0)))


def choose(candidates: Sequence[Candidate], item_features: set[str], user_features: set[str],
           generic: collections.Counter, cfg: GenerateConfig, matcher: FeatureMatcher) -> Candidate:
    """The best-scoring candidate; ties keep the earlier one (the greedy text comes first). Empty texts never
    win over a non-empty one."""
    usable = [c for c in candidates if c.text.strip()] or list(candidates)
    return max(usable, key=lambda c: candidate_score(c, item_features, user_features, generic, cfg, matcher))
