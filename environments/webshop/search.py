"""WebShop search: BM25 (``bm25s``, Lucene variant) behind a Lucene-style English analyzer.

WebShop searches a Lucene index (pyserini ``LuceneSearcher``, Anserini defaults k1 = 0.9,
b = 0.4, ``EnglishAnalyzer``) over one document per product (``Product.search_document``: title,
description, first feature, options) and shows the top 50 hits. ``BM25Index`` scores the same
documents with ``bm25s`` (``method="lucene"``, float64):

    score(q, d) = sum over query terms t present in d of
                  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

Lucene's formula (since Lucene 8 it drops the constant factor k1 + 1, which changes no ranking).
Query terms count with multiplicity (Anserini's bag-of-words query weights a repeated term by its
count). Only documents sharing a term with the query are returned, best first; equal scores keep
catalogue order (Lucene breaks ties by document number, i.e. indexing order).

``analyze`` follows Lucene's ``EnglishAnalyzer`` chain:

1. tokens as Unicode word segmentation (UAX #29, Lucene's ``StandardTokenizer``) cuts them, for
   the characters product text uses: runs of word characters, joined across ``'`` / ``.``
   between letters (``women's``, ``e.g``) and across ``.`` / ``,`` / ``'`` between digits
   (``8.5``, ``1,000``);
2. a trailing possessive ``'s`` removed (``EnglishPossessiveFilter``), lower case;
3. Lucene's 33 English stop words removed (the same list as ``bm25s.stopwords.STOPWORDS_EN``);
4. Porter stemming (``PyStemmer``'s ``porter``: Snowball's edition of the original Porter
   algorithm) of tokens longer than two characters: Lucene's ``PorterStemFilter`` ports Porter's
   reference C code, which leaves one- and two-letter words alone (``s`` stays ``s``, ``us``
   stays ``us``) and departs from the published algorithm on a few step-2 suffixes such as
   ``-bli`` and ``-logi``.

Remaining differences from pyserini: the tokenizer is a regular expression, not the full UAX #29
rules (scripts without spaces, emoji, URLs), and Lucene stores each document length in one byte
(``SmallFloat``), so its |d| is rounded where ``bm25s`` uses the exact length. Both can reorder
near-ties; neither changes which documents match.
"""
from __future__ import annotations

import re
from typing import Sequence

import bm25s
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

BM25_K1 = 0.9
BM25_B = 0.4
SEARCH_RETURN_N = 50
LUCENE_ENGLISH_STOP_WORDS = frozenset(STOPWORDS_EN)
_LETTER = r"[^\W\d_]"
_TOKEN = re.compile(
    rf"\w+(?:(?:(?<={_LETTER})['’.](?={_LETTER})|(?<=\d)[.,'’](?=\d))\w+)*")
_POSSESSIVE = re.compile(r"['’]s$")
_STEMMER = Stemmer.Stemmer("porter")


def analyze(text: str) -> list[str]:
    """Tokens of ``text`` as indexed and queried (Lucene English analyzer chain, see above)."""
    tokens = [_POSSESSIVE.sub("", token) for token in _TOKEN.findall(text.lower())]
    return [_STEMMER.stemWord(token) if len(token) > 2 else token for token in tokens
            if token and token not in LUCENE_ENGLISH_STOP_WORDS]


class BM25Index:
    """A ``bm25s`` index over (doc_id, text) pairs, ranked as Lucene ranks (see module)."""

    def __init__(self, documents: Sequence[tuple[str, str]], k1: float = BM25_K1,
                 b: float = BM25_B):
        if not documents:
            raise ValueError("documents must be non-empty")
        self.doc_ids = [doc_id for doc_id, _ in documents]
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")
        self._bm25.index([analyze(text) for _, text in documents], create_empty_token=False,
                         show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``; 0 where no query term occurs.

        Returns: float64 [num_documents].
        """
        term_ids = self._bm25.get_tokens_ids(analyze(query))
        if not term_ids:
            return np.zeros(len(self.doc_ids))
        return self._bm25.get_scores_from_ids(term_ids)

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[str]:
        """The ids of the ``k`` best documents sharing a term with ``query``, best first (ties:
        index order)."""
        scores = self.scores(query)
        matching = np.flatnonzero(scores > 0)
        ranked = matching[np.argsort(-scores[matching], kind="stable")]
        return [self.doc_ids[position] for position in ranked[:k]]
