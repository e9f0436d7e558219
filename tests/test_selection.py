"""Votes, RPC, DeepConf confidences, Adaptive-Consistency stopping rules, multi-temperature exit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttscale.selection import (
    RPCResult,
    VoteResult,
    beta_stop_probability,
    bottom_fraction_confidence,
    fit_weibull_mixture,
    group_confidences,
    lowest_group_confidence,
    mean_confidence,
    multi_temperature_exit,
    rpc,
    tail_confidence,
    token_confidence,
    vote,
)

# --------------------------------------------------------------------------------------------
# vote
# --------------------------------------------------------------------------------------------


def test_vote_plain_majority():
    r = vote([0, 1, 1, 2, 1, 0])
    assert isinstance(r, VoteResult)
    assert r.winner == 1
    assert r.scores == {0: 2.0, 1: 3.0, 2: 1.0}
    assert r.share == pytest.approx(0.5)
    assert r.representative == 1


def test_vote_weights_can_overturn_the_count():
    r = vote([0, 0, 0, 1], weights=[1.0, 1.0, 1.0, 5.0])
    assert r.winner == 1
    assert r.scores == {0: 3.0, 1: 5.0}
    assert r.share == pytest.approx(5.0 / 8.0)
    assert r.representative == 3


def test_vote_answerless_samples_do_not_vote():
    r = vote([None, 0, None, None, 1, 1], weights=[100.0, 1.0, 100.0, 100.0, 1.0, 1.0])
    assert r.winner == 1
    assert r.scores == {0: 1.0, 1: 2.0}
    assert r.share == pytest.approx(2.0 / 3.0)
    assert r.representative == 4


def test_vote_all_answerless():
    r = vote([None, None])
    assert r.winner is None and r.representative is None and r.scores == {} and r.share == 0.0
    assert vote([]).winner is None


def test_vote_tie_broken_by_summed_logprob():
    # Clusters 0 and 1 tie on count; cluster 1 has the larger summed sequence log-prob.
    r = vote([0, 1, 0, 1, 2], tie_scores=[-5.0, -1.0, -5.0, -2.0, 0.0])
    assert r.winner == 1
    assert r.representative == 1  # highest tie score inside the cluster


def test_vote_tie_broken_by_earliest_finish_then_cluster_id():
    cids = [0, 1, 0, 1]
    ties = [-1.0, -1.0, -1.0, -1.0]
    r = vote(cids, tie_scores=ties, finish_order=[3.0, 0.5, 2.0, 4.0])
    assert r.winner == 1  # holds the earliest-finished sample
    r = vote(cids, tie_scores=ties, finish_order=[1.0, 1.0, 2.0, 2.0])
    assert r.winner == 0  # everything tied: lowest cluster id
    assert vote([1, 0]).winner == 0


def test_vote_representative_order():
    cids = [0, 0, 0, 0]
    # Highest tie score wins.
    assert vote(cids, tie_scores=[-3.0, -1.0, -2.0, -1.5]).representative == 1
    # Equal tie scores: earliest finish.
    assert vote(cids, tie_scores=[-1.0] * 4, finish_order=[4, 3, 1, 2]).representative == 2
    # Nothing distinguishes them: lowest index.
    assert vote(cids, tie_scores=[-1.0] * 4, finish_order=[1, 1, 1, 1]).representative == 0


def test_vote_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        vote([0, 1], weights=[1.0])


def test_vote_result_is_frozen():
    r = vote([0])
    with pytest.raises(AttributeError):
        r.winner = 3  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# RPC
# --------------------------------------------------------------------------------------------

# 3 confident paths with the right answer (cluster 0), 12 low-probability paths with a wrong
# answer (cluster 1). All texts are distinct.
_HI = [0.90, 0.92, 0.88]
_LO = [0.30, 0.28, 0.32, 0.31, 0.29, 0.27, 0.33, 0.30, 0.26, 0.34, 0.31, 0.29]
_CIDS = [0] * len(_HI) + [1] * len(_LO)
_ELL = [math.log(p) for p in _HI + _LO]
_TEXTS = [f"path {i}" for i in range(len(_CIDS))]


def test_rpc_pruning_flips_the_decision():
    assert vote(_CIDS).winner == 1  # plain self-consistency picks the wrong answer
    plain = rpc(_CIDS, _ELL, _TEXTS, prune=False)
    assert plain.winner == 1  # so does perplexity consistency without pruning (3.6 > 2.7)
    assert plain.scores[0] == pytest.approx(2.70)
    assert plain.scores[1] == pytest.approx(3.60)
    assert plain.weibull is None and not any(plain.pruned)

    r = rpc(_CIDS, _ELL, _TEXTS)
    assert isinstance(r, RPCResult)
    assert r.winner == 0
    assert r.pruned == [False] * 3 + [True] * 12
    assert r.scores[0] == pytest.approx(2.70)
    assert r.scores[1] == pytest.approx(0.0)
    assert r.confidence == pytest.approx(1.0)
    assert r.representative == 1  # p = 0.92
    assert r.weibull is not None


def test_rpc_identical_texts_count_once():
    # Five copies of one text at p = 0.6 against two distinct texts at p = 0.4.
    cids = [0] * 5 + [1, 1]
    ell = [math.log(0.6)] * 5 + [math.log(0.4)] * 2
    texts = ["same"] * 5 + ["a", "b"]
    r = rpc(cids, ell, texts)
    assert not any(r.pruned) and r.weibull is None  # 7 paths < min_paths
    assert r.scores == pytest.approx({0: 0.6, 1: 0.8})
    assert r.winner == 1
    assert r.confidence == pytest.approx(0.8 / 1.4)
    # With distinct texts the copies all count.
    r2 = rpc(cids, ell, [f"t{i}" for i in range(7)])
    assert r2.winner == 0 and r2.scores[0] == pytest.approx(3.0)


def test_rpc_skips_pruning_on_constant_probabilities():
    cids = [0, 1, 1, 0, 1, 1, 0, 1, 1, 2]
    r = rpc(cids, [math.log(0.5)] * 10, [str(i) for i in range(10)])
    assert r.weibull is None and not any(r.pruned)
    assert r.winner == 1 and r.scores[1] == pytest.approx(3.0)


def test_rpc_answerless_paths_and_determinism():
    cids = [None, *_CIDS, None]
    ell = [math.log(0.95), *_ELL, math.log(0.2)]
    texts = ["x", *_TEXTS, "y"]
    first = rpc(cids, ell, texts)
    second = rpc(cids, ell, texts)
    assert first == second
    assert first.winner == 0
    assert first.pruned[0] is False  # the answerless path above the mean is kept
    assert None not in first.scores
    assert rpc([None, None], [-1.0, -2.0], ["a", "b"]).winner is None


def test_fit_weibull_mixture_orders_components():
    w, k1, lam1, k2, lam2 = fit_weibull_mixture(_HI + _LO)
    assert 0.2 - 1e-9 <= w <= 0.8 + 1e-9
    assert min(k1, lam1, k2, lam2) >= 0.01 - 1e-12
    mean1 = lam1 * math.gamma(1 + 1 / k1)
    mean2 = lam2 * math.gamma(1 + 1 / k2)
    assert mean1 > mean2
    assert mean1 == pytest.approx(np.mean(_HI), abs=0.05)
    assert mean2 == pytest.approx(np.mean(_LO), abs=0.05)


# --------------------------------------------------------------------------------------------
# DeepConf confidences
# --------------------------------------------------------------------------------------------


def test_token_confidence():
    c = token_confidence([[-1.0, -2.0, -3.0], [-0.5, -0.5]])
    assert c == pytest.approx([2.0, 0.5])
    # At most k entries, the largest ones: a 21st entry (sampled token outside the top k) is ignored.
    c = token_confidence([[-0.1, -1.0, -2.0, -9.0]], k=3)
    assert c == pytest.approx([(0.1 + 1.0 + 2.0) / 3])
    rows = [[-0.1 * j for j in range(21)], [-0.2 * j for j in range(21)]]
    expect = [np.mean([0.1 * j for j in range(20)]), np.mean([0.2 * j for j in range(20)])]
    assert token_confidence(rows) == pytest.approx(expect)
    assert token_confidence([]).shape == (0,)
    assert token_confidence([[], [-2.0]]) == pytest.approx([0.0, 2.0])


def test_group_confidences_hand_computed():
    conf = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert group_confidences(conf, window=2) == pytest.approx([1.5, 2.5, 3.5, 4.5])
    assert group_confidences(conf, window=3) == pytest.approx([2.0, 3.0, 4.0])
    assert group_confidences(conf, window=5) == pytest.approx([3.0])
    assert group_confidences(conf, window=2048) == pytest.approx([3.0])  # shorter than the window
    assert group_confidences([], window=4).shape == (0,)


def test_group_confidences_match_naive_windows():
    rng = np.random.default_rng(7)
    conf = rng.uniform(0.0, 5.0, size=3000)
    naive = np.array([conf[i : i + 256].mean() for i in range(3000 - 256 + 1)])
    assert np.allclose(group_confidences(conf, window=256), naive)


def test_trace_scores_hand_computed():
    conf = [4.0, 1.0, 1.0, 6.0, 8.0, 2.0]
    # windows of 2: 2.5, 1.0, 3.5, 7.0, 5.0
    assert lowest_group_confidence(conf, window=2) == pytest.approx(1.0)
    assert bottom_fraction_confidence(conf, window=2, fraction=0.4) == pytest.approx((1.0 + 2.5) / 2)
    assert bottom_fraction_confidence(conf, window=2, fraction=0.01) == pytest.approx(1.0)
    assert tail_confidence(conf, tail=2) == pytest.approx(5.0)
    assert tail_confidence(conf, tail=100) == pytest.approx(22.0 / 6)
    assert mean_confidence(conf) == pytest.approx(22.0 / 6)
    assert lowest_group_confidence(conf, window=100) == pytest.approx(22.0 / 6)
    assert lowest_group_confidence([], window=2) == 0.0


# --------------------------------------------------------------------------------------------
# Adaptive-Consistency's Beta stopping probability
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "prob"),
    [
        (1, 0, 0.75),
        (3, 0, 0.9375),
        (4, 0, 0.96875),
        (5, 1, 0.9375),
        (6, 1, 0.96484),
        (7, 2, 0.94531),
        (8, 2, 0.96729),
    ],
)
def test_beta_stop_probability_vectors(a, b, prob):
    assert beta_stop_probability(a, b) == pytest.approx(prob, abs=5e-6)


# --------------------------------------------------------------------------------------------
# Multi-temperature voting exit
# --------------------------------------------------------------------------------------------


def test_multi_temperature_exit_agreement():
    pools = {0.6: [3] * 8, 1.0: [3] * 7 + [1], 1.4: [3] * 8 + [None] * 2 + [2] * 2}
    assert multi_temperature_exit(pools) == 3


def test_multi_temperature_exit_refusals():
    # A temperature still below the minimum pool size.
    assert multi_temperature_exit({0.6: [3] * 8, 1.0: [3] * 7}) is None
    # A temperature whose majority share is below 0.8.
    assert multi_temperature_exit({0.6: [3] * 8, 1.0: [3] * 6 + [1, 2]}) is None
    # Confident temperatures that disagree.
    assert multi_temperature_exit({0.6: [3] * 8, 1.0: [4] * 8}) is None
    # Answerless samples count toward the pool size but not toward the share.
    assert multi_temperature_exit({0.6: [3] * 4 + [None] * 4, 1.0: [3] * 8}) == 3
    assert multi_temperature_exit({0.6: [None] * 8}) is None
    # A tied majority is not confident.
    assert multi_temperature_exit({0.6: [1, 2] * 4}, share=0.5) is None
    assert multi_temperature_exit({}) is None
    assert multi_temperature_exit({0.6: [5, 5, 5]}, min_per_temperature=3) == 5
