"""The official metrics on hand-worked cases (the numbers below are worked out by hand from the definitions)."""

from __future__ import annotations

import pytest

from sdrpn import metrics


class TestVqaAccuracy:
    def test_leave_one_out_over_ten_answers(self):
        # 3 humans said "coca cola", 7 "coke": leaving out a "coca cola" leaves 2 matches (2/3), a "coke" 3 (1)
        answers = ["coca cola"] * 3 + ["coke"] * 7
        assert metrics.vqa_accuracy("coca cola", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
        assert metrics.vqa_accuracy("coke", answers) == pytest.approx(1.0)

    def test_one_match_is_worth_a_third_on_nine_subsets(self):
        answers = ["yes"] + ["no"] * 9
        assert metrics.vqa_accuracy("yes", answers) == pytest.approx(9 * (1 / 3) / 10)
        assert metrics.vqa_accuracy("maybe", answers) == 0.0

    @pytest.mark.parametrize(
        ("raw", "normalised"),
        [
            ("The Coca-Cola.", "coca cola"),  # article, hyphen between words -> space, final period
            ("Two", "2"),  # number words
            ("dont", "don't"),  # contractions restored
            ("3.5", "3.5"),  # a decimal point stays
            ("1,000", "1000"),  # commas go
            ("an apple!", "apple"),
            ("it's - fine", "it 's fine"),  # a mark beside a space is dropped; "'s" split off
            ("  new\tyork \n", "new york"),
        ],
    )
    def test_answer_normalisation(self, raw, normalised):
        assert metrics.normalize_vqa_answer(raw) == normalised

    def test_normalisation_applies_to_prediction_and_answers(self):
        assert metrics.vqa_accuracy("The Coca-Cola.", ["coca cola"] * 10) == 1.0

    def test_bad_predictions_score_zero(self):
        answers = ["a b"] * 10
        assert metrics.vqa_accuracy("", answers) == 0.0
        assert metrics.vqa_accuracy(None, answers) == 0.0
        assert metrics.vqa_accuracy("x" * 100_000, answers) == 0.0
        assert metrics.vqa_accuracy("a b", []) == 0.0


class TestAnls:
    def test_similarity_above_threshold_counts(self):
        assert metrics.anls("abce", ["abcd"]) == pytest.approx(0.75)  # one edit in four characters
        assert metrics.anls("ab", ["abcd"]) == pytest.approx(0.5)  # at the threshold: kept
        assert metrics.anls("a", ["abcd"]) == 0.0  # 0.25 < 0.5

    def test_best_answer_case_and_whitespace(self):
        assert metrics.anls("  Hello   World ", ["goodbye", "hello world"]) == 1.0
        # "1,200": one deletion in six characters; "$1,200.00": three in nine -> the best, 5/6
        assert metrics.anls("$1,200", ["1,200", "$1,200.00"]) == pytest.approx(1 - 1 / 6)
        assert metrics.anls("$1,200", ["$1,200.00"]) == pytest.approx(1 - 3 / 9)

    def test_threshold_and_bad_predictions(self):
        assert metrics.anls("ab", ["abcd"], threshold=0.6) == 0.0
        assert metrics.anls("", ["abc"]) == 0.0
        assert metrics.anls(None, ["abc"]) == 0.0
        assert metrics.anls("abc" * 10_000, ["abc"]) == 0.0


class TestRelaxedAccuracy:
    @pytest.mark.parametrize(
        ("prediction", "target", "right"),
        [
            ("10.4", "10", 1.0),  # 4% off
            ("10.6", "10", 0.0),  # 6% off
            ("9.5", "10", 1.0),  # exactly 5%
            ("12%", "0.12", 1.0),  # a percentage is a fraction
            ("Yes", "yes", 1.0),  # text: exact, any case
            ("yes ", "Yes", 1.0),
            ("0", "0", 1.0),  # a zero target is compared as text
            ("0.0", "0", 0.0),
            ("", "10", 0.0),
            (None, "10", 0.0),
        ],
    )
    def test_cases(self, prediction, target, right):
        assert metrics.relaxed_accuracy(prediction, target) == right


class TestOcrBench:
    def test_containment_ignoring_case(self):
        assert metrics.ocrbench_score("The sign says HELLO world", ["hello"]) == 1.0
        assert metrics.ocrbench_score("hel lo", ["hello"]) == 0.0
        assert metrics.ocrbench_score("line one\nline two", ["one line"]) == 1.0  # newline as space

    def test_formulas_ignore_spaces_but_not_case(self):
        assert metrics.ocrbench_score("x ^ { 2 }", ["x^{2}"], dataset="HME100k") == 1.0
        assert metrics.ocrbench_score("X^{2}", ["x^{2}"], dataset="HME100k") == 0.0

    def test_any_answer_and_no_empty_answer(self):
        assert metrics.ocrbench_score("cat", ["dog", "cat"]) == 1.0
        assert metrics.ocrbench_score("anything", [""]) == 0.0
        assert metrics.ocrbench_score(None, ["cat"]) == 0.0


class TestPope:
    @pytest.mark.parametrize(
        ("prediction", "parsed"),
        [
            ("Yes", "yes"),
            ("Yes, there is a dog.", "yes"),
            ("No, there is not.", "no"),
            ("There is not a dog in the image", "no"),
            ("yes. No doubt.", "yes"),  # only the first sentence counts
            ("I see no, dog", "no"),  # commas dropped before splitting
            ("", None),
            (None, None),
        ],
    )
    def test_parse(self, prediction, parsed):
        assert metrics.parse_yes_no(prediction) == parsed

    def test_scores(self):
        # TP at 0 and 4, FP at 1, FN at 2, TN at 3
        scores = metrics.pope_scores(["yes", "yes", "no", "no", "Yes."], ["yes", "no", "yes", "no", "yes"])
        assert scores["accuracy"] == pytest.approx(3 / 5)
        assert scores["precision"] == pytest.approx(2 / 3)
        assert scores["recall"] == pytest.approx(2 / 3)
        assert scores["f1"] == pytest.approx(2 / 3)
        assert scores["yes_ratio"] == pytest.approx(3 / 5)

    def test_empty_answer_is_wrong_either_way(self):
        scores = metrics.pope_scores(["", ""], ["yes", "no"])
        assert scores["accuracy"] == 0.0 and scores["f1"] == 0.0 and scores["yes_ratio"] == 0.0


class TestMultipleChoice:
    OPTIONS = {"A": "blue", "B": "red", "C": "green", "D": "white"}

    @pytest.mark.parametrize(
        ("prediction", "letter"),
        [
            ("B", "B"),
            ("(C)", "C"),
            ("C.", "C"),
            ("D) white", "D"),
            ("The answer is A.", "A"),
            ("Answer: b", "B"),
            ("The answer is a red one", "B"),  # an article, not option A
            ("red", "B"),  # no letter: the one option whose text it contains
            ("The color is green", "C"),
            ("A or B", None),  # two letters
            ("red or green", None),  # two options' texts
            ("E", None),  # not an option
            ("", None),
            (None, None),
            ("x" * 50_000, None),
        ],
    )
    def test_parse(self, prediction, letter):
        assert metrics.parse_option_letter(prediction, self.OPTIONS) == letter

    def test_accuracy(self):
        options = [self.OPTIONS] * 3
        assert metrics.multiple_choice_accuracy(["A", "(B) red", "nothing"], options, ["A", "B", "C"]) == 2 / 3


def test_exact_match():
    assert metrics.exact_match(" Red ", ["red"]) == 1.0
    assert metrics.exact_match("red.", ["red"]) == 0.0
    assert metrics.exact_match(None, ["red"]) == 0.0
