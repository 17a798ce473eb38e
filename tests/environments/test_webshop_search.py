"""BM25 stand-in: the formula on a hand-computed corpus, and ranking sanity on the real goals."""
import math

import pytest

from environments.webshop.env import load_offline_shop
from environments.webshop.goals import split_goal_indices
from environments.webshop.search import BM25Index, analyze, stem


def test_analyzer():
    assert analyze("Scrubs & Body Treatments with Tea-Tree for dry hair") == [
        "scrub", "body", "treatment", "tea", "tree", "dry", "hair"]
    assert [stem(w) for w in ("accessories", "glasses", "dress", "gas", "boxes")] == [
        "accessory", "glass", "dress", "gas", "box"]


def test_bm25_scores_match_hand_computation():
    index = BM25Index([("d0", "red apple"), ("d1", "green apple pie"), ("d2", "banana")])
    # N=3, df(apple)=2: idf = ln(1 + 1.5/2.5); lengths 2, 3, 1 -> avgdl 2; k1 0.9, b 0.4.
    idf = math.log(1.6)
    d0 = idf * 1 * 1.9 / (1 + 0.9 * (0.6 + 0.4 * 2 / 2))
    d1 = idf * 1 * 1.9 / (1 + 0.9 * (0.6 + 0.4 * 3 / 2))
    scores = index.scores("apple")
    assert scores == pytest.approx({0: d0, 1: d1})
    assert index.search("apple") == ["d0", "d1"]             # banana shares no term
    assert index.search("apple", k=1) == ["d0"]
    assert index.search("the of with") == []                 # stop words only


def test_bm25_repeated_query_terms_count_twice():
    index = BM25Index([("a", "lamp shade"), ("b", "brass stand"), ("c", "lamp brass")])
    # "lamp lamp brass": the lamp clause counts twice, so "a" (lamp) beats "b" (brass).
    assert index.search("lamp lamp brass") == ["c", "a", "b"]


def test_bm25_rejects_empty_corpus():
    with pytest.raises(ValueError, match="documents must be non-empty"):
        BM25Index([])


def target_ranks(shop, goal_indices):
    """Rank (0-based, None beyond 50) of each goal's product when searching its instruction."""
    ranks = []
    for i in goal_indices:
        goal = shop.goals[i]
        hits = shop.search(goal.instruction_text.lower())
        ranks.append(hits.index(goal.asin) if goal.asin in hits else None)
    return ranks


def test_target_product_ranks_high_for_its_own_instruction():
    shop = load_offline_shop()
    ranks = target_ranks(shop, split_goal_indices(len(shop.goals), "test"))
    top1 = sum(r == 0 for r in ranks) / len(ranks)
    top10 = sum(r is not None and r < 10 for r in ranks) / len(ranks)
    print(f"test goals: target at rank 1 for {top1:.3f}, on page 1 for {top10:.3f}")
    assert top10 >= 0.9
    assert top1 >= 0.5


@pytest.mark.parametrize("product_type", ["men's shorts", "floor lamps", "makeup palettes"])
def test_type_words_alone_find_mostly_that_type(product_type):
    shop = load_offline_shop()
    top10 = shop.search(product_type)[:10]
    assert sum(shop.products[a].query == product_type for a in top10) >= 7
