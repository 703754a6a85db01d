"""Each benchmark's aggregate score (the main figure and its sub-scores) on hand-made predictions."""

from __future__ import annotations

import pytest

from sdrpn.evaluation.benchmarks import BENCHMARKS
from sdrpn.evaluation.readers import BenchSample

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "white"}


def sample(answers, category="", options=None, **extra) -> BenchSample:
    return BenchSample("k", "q", lambda: None, list(answers), category, options or {}, extra)


def test_hrbench_averages_the_option_cycles():
    samples = [
        sample(["A"], "single", OPTIONS, cycle="c0"),
        sample(["B"], "single", OPTIONS, cycle="c0"),
        sample(["C"], "cross", OPTIONS, cycle="c0"),
        sample(["D"], "cross", OPTIONS, cycle="c1"),
    ]
    scores = BENCHMARKS["hrbench4k"].score(samples, ["A", "A", "nothing", "The answer is D."])
    assert scores["score"] == pytest.approx((1 / 3 + 1) / 2)  # cycle c0: 1 of 3, cycle c1: 1 of 1
    assert scores["by_category"] == {"cross": 0.5, "single": 0.5}


def test_pope_scores_f1_overall_and_per_split():
    samples = [sample([label], split) for label, split in [("yes", "random"), ("no", "random"), ("yes", "popular")]]
    scores = BENCHMARKS["pope"].score(samples, ["Yes.", "yes", "No, there is none."])
    # TP 1, FP 1, FN 1: precision = recall = F1 = 1/2
    assert scores["score"] == scores["f1"] == pytest.approx(0.5)
    assert scores["accuracy"] == pytest.approx(1 / 3) and scores["yes_ratio"] == pytest.approx(2 / 3)
    assert scores["by_category"] == {"popular": 0.0, "random": pytest.approx(2 / 3)}


def test_means_and_categories():
    ten = ["stop"] * 10
    assert BENCHMARKS["textvqa"].score([sample(ten), sample(ten)], ["Stop.", "go"])["score"] == 0.5
    ocr = [sample(["HELLO"], "Regular Text Recognition", dataset="IIIT5K"), sample(["x^2"], "HME", dataset="HME100k")]
    scores = BENCHMARKS["ocrbench"].score(ocr, ["it says hello", "X^2"])
    assert scores["score"] == 0.5 and scores["by_category"] == {"HME": 0.0, "Regular Text Recognition": 1.0}
    charts = [sample(["10"], "human_test"), sample(["Paris"], "augmented_test")]
    assert BENCHMARKS["chartqa"].score(charts, ["10.3", "paris"])["score"] == 1.0
    assert BENCHMARKS["docvqa"].score([sample(["abcd"])], ["abce"])["score"] == pytest.approx(0.75)
    vstar = [sample(["A"], "direct_attributes", OPTIONS), sample(["B"], "relative_position", OPTIONS)]
    assert BENCHMARKS["vstar"].score(vstar, ["A", "red"])["by_category"] == {
        "direct_attributes": 1.0,
        "relative_position": 0.0,
    }


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_failed_samples_score_zero(name):
    """A sample that could not be answered has prediction None: wrong, never an exception."""
    answers = ["stop"] * 10 if name == "textvqa" else ["yes"] if name == "pope" else ["A"]
    scores = BENCHMARKS[name].score([sample(answers, options=OPTIONS, dataset="x", cycle="c")], [None])
    assert scores["score"] == 0.0
