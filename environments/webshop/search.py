"""Pure-Python BM25 search: a STAND-IN for WebShop's pyserini/Lucene index.

WebShop searches a Lucene index (pyserini ``LuceneSearcher``, Anserini defaults k1 = 0.9,
b = 0.4, English analyzer) over one document per product (``Product.search_document``: title,
description, first feature, options) and shows the top 50 hits. This module scores the same
documents with the same BM25 formula and parameters:

    score(q, d) = sum over query terms t present in d of
                  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

(query terms are counted with multiplicity, as Lucene's boolean OR of term clauses does). The
analyzer is simplified: lower-case alphanumeric tokens, Lucene's English stop words removed, and
a light plural stemmer instead of Porter's. Rankings are therefore close to, not identical with,
WebShop's; ties are broken by catalogue order. Only documents sharing a term with the query are
returned (Lucene does the same).
"""
from __future__ import annotations

import collections
import math
import re
from typing import Sequence

BM25_K1 = 0.9
BM25_B = 0.4
SEARCH_RETURN_N = 50
_TOKEN = re.compile(r"[0-9a-z]+")
LUCENE_ENGLISH_STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their "
    "then there these they this to was will with".split())


def stem(token: str) -> str:
    """Light English plural stemmer (``ies`` -> ``y``, ``es`` after s/x/ch/sh, final ``s``)."""
    if len(token) > 4 and token.endswith("ies"):
        return token[:-3] + "y"
    if len(token) > 4 and token.endswith(("sses", "xes", "ches", "shes")):
        return token[:-2]
    if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def analyze(text: str) -> list[str]:
    """Tokens of ``text`` as indexed and queried."""
    return [stem(token) for token in _TOKEN.findall(text.lower())
            if token not in LUCENE_ENGLISH_STOP_WORDS]


class BM25Index:
    """An in-memory BM25 index over (doc_id, text) pairs."""

    def __init__(self, documents: Sequence[tuple[str, str]], k1: float = BM25_K1,
                 b: float = BM25_B):
        if not documents:
            raise ValueError("documents must be non-empty")
        self.k1, self.b = k1, b
        self.doc_ids = [doc_id for doc_id, _ in documents]
        self._postings: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        self._lengths = []
        for position, (_, text) in enumerate(documents):
            counts = collections.Counter(analyze(text))
            self._lengths.append(sum(counts.values()))
            for term, count in counts.items():
                self._postings[term].append((position, count))
        self._average_length = sum(self._lengths) / len(self._lengths)

    def idf(self, term: str) -> float:
        """Lucene's BM25 idf of an analysed term."""
        df = len(self._postings.get(term, ()))
        return math.log(1.0 + (len(self.doc_ids) - df + 0.5) / (df + 0.5))

    def scores(self, query: str) -> dict[int, float]:
        """Document position -> BM25 score, for documents sharing a term with ``query``."""
        totals: dict[int, float] = collections.defaultdict(float)
        for term in analyze(query):
            postings = self._postings.get(term)
            if not postings:
                continue
            idf = self.idf(term)
            for position, tf in postings:
                norm = self.k1 * (1 - self.b + self.b * self._lengths[position]
                                  / self._average_length)
                totals[position] += idf * tf * (self.k1 + 1) / (tf + norm)
        return totals

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[str]:
        """The ids of the ``k`` best documents, best first (ties: index order)."""
        ranked = sorted(self.scores(query).items(), key=lambda item: (-item[1], item[0]))
        return [self.doc_ids[position] for position, _ in ranked[:k]]
