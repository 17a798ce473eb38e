"""String matching used by WebShop's reward: fuzzy token-set ratio, colour normalisation, nouns.

WebShop scores a purchase with ``thefuzz.fuzz.token_set_ratio`` (a match is a score > 85), a
colour normaliser, and spaCy noun extraction for the title score. This module implements the
first two exactly as defined by those libraries, in pure Python, and a labelled stand-in for the
third:

* ``ratio(a, b) = round(100 * 2 * LCS(a, b) / (len(a) + len(b)))`` — the Indel similarity
  (LCS = longest common subsequence of characters), 0 when both strings are empty.
* ``token_set_ratio(a, b)``: both strings are pre-processed (lower-case, every non-alphanumeric
  character becomes a space, stripped) and split into token sets A, B. With
  ``S = sorted(A & B)``, ``D_ab = sorted(A - B)``, ``D_ba = sorted(B - A)`` joined by spaces,
  ``t0 = S``, ``t1 = S + " " + D_ab``, ``t2 = S + " " + D_ba`` (stripped), the score is
  ``max(ratio(t0, t1), ratio(t0, t2), ratio(t1, t2))``; 0 if either string has no token. A
  non-empty intersection with one empty difference therefore scores 100.
* ``normalize_color(s)``: the first colour of ``COLOR_VOCABULARY`` contained in ``s`` (substring
  test, vocabulary order), else ``s`` unchanged.
* ``title_nouns(title)`` is NOT spaCy: it keeps the lower-cased alphabetic words of the title that
  are not function words or common adjectives/adverbs. WebShop keeps tokens tagged NOUN / PROPN by
  ``en_core_web_lg``, which is not installable offline. The stand-in over-approximates the noun
  set (some adjectives and verbs survive), which makes the title score of a non-matching
  product slightly higher than spaCy's would be; the gold product scores 1 either way.
"""
from __future__ import annotations

import re

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_WORD = re.compile(r"[a-z]+")

COLOR_VOCABULARY = (
    "black", "white", "grey", "gray", "silver", "gold", "rose", "red", "pink", "purple",
    "blue", "navy", "teal", "green", "olive", "yellow", "orange", "brown", "beige", "tan",
    "khaki", "ivory", "cream", "clear", "walnut", "espresso", "oak",
)

_NON_NOUN_WORDS = frozenset("""
a an and are as at be but by for from if in into is it its no not of on or such that the their
then there these they this to was will with without your you our we me my i he she his her him
new best great premium quality high low easy extra super ultra pro plus mini small large big
long short soft hard light heavy natural free fast quick slim classic modern simple perfect
daily fresh pure real true good fine full half multi non anti all any each every more most
very well also only just over under up down out off than too so can may set sets pack count
""".split())


def default_process(text: str) -> str:
    """thefuzz's pre-processing: lower-case, non-alphanumerics to spaces, stripped."""
    return _NON_ALNUM.sub(" ", str(text).lower()).strip()


def _lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for char_a in a:
        current = [0]
        for j, char_b in enumerate(b):
            if char_a == char_b:
                current.append(previous[j] + 1)
            else:
                current.append(max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _raw_ratio(a: str, b: str) -> float:
    total = len(a) + len(b)
    return 100.0 if total == 0 else 100.0 * 2 * _lcs_length(a, b) / total


def ratio(a: str, b: str) -> int:
    """Indel similarity of two strings, rounded to an integer percentage."""
    return int(round(_raw_ratio(a, b)))


def token_set_ratio(a: str, b: str) -> int:
    """thefuzz's ``token_set_ratio`` (see module docstring for the definition)."""
    tokens_a = set(default_process(a).split())
    tokens_b = set(default_process(b).split())
    if not tokens_a or not tokens_b:
        return 0
    common = " ".join(sorted(tokens_a & tokens_b))
    only_a = " ".join(sorted(tokens_a - tokens_b))
    only_b = " ".join(sorted(tokens_b - tokens_a))
    with_a = f"{common} {only_a}".strip()
    with_b = f"{common} {only_b}".strip()
    best = max(_raw_ratio(common, with_a), _raw_ratio(common, with_b), _raw_ratio(with_a, with_b))
    return int(round(best))


def fuzzy_match(a: str, b: str, threshold: int = 85) -> bool:
    """WebShop's fuzzy equality: ``token_set_ratio(a, b) > threshold``."""
    return token_set_ratio(a, b) > threshold


def normalize_color(value: str) -> str:
    """The first vocabulary colour contained in ``value``, else ``value`` unchanged."""
    for color in COLOR_VOCABULARY:
        if color in value:
            return color
    return value


def title_nouns(title: str) -> list[str]:
    """Stand-in for spaCy's NOUN/PROPN tokens of a product title (see module docstring)."""
    return [word for word in _WORD.findall(title.lower())
            if len(word) > 1 and word not in _NON_NOUN_WORDS]
