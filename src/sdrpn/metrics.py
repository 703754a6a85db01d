"""The benchmarks' official scores, as pure functions of a prediction and its ground truth.

Each follows the published definition and the normalisation of the evaluation code the paper's numbers come
from (lmms-eval's task utilities, themselves taken from the benchmarks' own scripts). A prediction that is
empty, very long or not text scores 0; nothing here raises on a model's output.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence

# --- VQA accuracy (TextVQA, VQAv2): the EvalAI answer normalisation ------------------------------------------

_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've "
    "somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't "
    "we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've "
    "you'll you're you've"
).split()
# The official table maps each spelling missing one apostrophe (the first or the last, for words with two) back.
_CONTRACTIONS = {
    missing: word
    for word in _CONTRACTED
    for missing in {word.replace("'", "", 1), word[::-1].replace("'", "", 1)[::-1]}
    if missing != word
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not starting a decimal part


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's answer processing: lower case, punctuation dropped (or a space where it joins words), periods
    not before a digit dropped, number words as digits, articles dropped, contractions restored."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        joins = mark + " " in text or " " + mark in text or spaced
        out = out.replace(mark, "" if joins else " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(word, word) for word in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA / VQAv2 accuracy: for each of the (ten) human answers left out in turn, min(#matches among the
    others / 3, 1); the mean over the leave-one-out subsets."""
    if not answers:
        return 0.0
    predicted = normalize_vqa_answer(_text(prediction))
    humans = [normalize_vqa_answer(answer) for answer in answers]
    scores = []
    for left_out in range(len(humans)):
        matches = sum(answer == predicted for i, answer in enumerate(humans) if i != left_out)
        scores.append(min(1.0, matches / 3))
    return statistics.fmean(scores)


# --- ANLS (DocVQA, InfographicVQA) ----------------------------------------------------------------------------


def _levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute), two rows of the dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one question: the best 1 - distance / longer length over the
    answers (lower case, whitespace collapsed), 0 below ``threshold``."""
    predicted = " ".join(_text(prediction).lower().split())
    best = 0.0
    for answer in answers:
        target = " ".join(str(answer).lower().split())
        longer = max(len(predicted), len(target))
        if longer == 0:
            return 1.0
        if abs(len(predicted) - len(target)) / longer > 1 - threshold:  # the distance is at least the difference
            continue
        best = max(best, 1 - _levenshtein(predicted, target) / longer)
    return best if best >= threshold else 0.0


# --- ChartQA relaxed accuracy ---------------------------------------------------------------------------------


def _number(text: str) -> float | None:
    """A number, or a percentage as a fraction ("12%" -> 0.12); None for anything else."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA: a numeric answer within 5% of a non-zero numeric target is right; anything else must match
    exactly, ignoring case."""
    predicted, target = _text(prediction).strip(), str(target).strip()
    predicted_number, target_number = _number(predicted), _number(target)
    if predicted_number is not None and target_number:
        return float(abs(predicted_number - target_number) / abs(target_number) <= tolerance)
    return float(predicted.lower() == target.lower())


# --- OCRBench -------------------------------------------------------------------------------------------------


def ocrbench_score(prediction: str, answers: Sequence[str], dataset: str = "") -> float:
    """OCRBench: 1 when an answer is contained in the prediction (case-insensitive, newlines as spaces); for
    handwritten formulas (HME100k) case-sensitive with all spaces removed."""
    predicted = _text(prediction).strip()
    for answer in answers:
        if dataset == "HME100k":
            target, text = (s.strip().replace("\n", " ").replace(" ", "") for s in (str(answer), predicted))
        else:
            target, text = (s.lower().strip().replace("\n", " ") for s in (str(answer), predicted))
        if target and target in text:
            return 1.0
    return 0.0


# --- POPE -----------------------------------------------------------------------------------------------------


def parse_yes_no(prediction: str) -> str | None:
    """POPE's rule: the first sentence, commas dropped; "no" if it holds the word "no", "No" or "not", else
    "yes". An empty prediction is neither (None)."""
    text = _text(prediction).strip()
    if not text:
        return None
    words = text.split(".")[0].replace(",", "").split()
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of "yes" (the object is there), and the share of "yes" answers."""
    parsed = [parse_yes_no(p) for p in predictions]
    truth = [str(label).strip().lower() for label in labels]
    true_yes = sum(p == "yes" and t == "yes" for p, t in zip(parsed, truth))
    said_yes = sum(p == "yes" for p in parsed)
    are_yes = sum(t == "yes" for t in truth)
    precision = true_yes / said_yes if said_yes else 0.0
    recall = true_yes / are_yes if are_yes else 0.0
    return {
        "accuracy": sum(p == t for p, t in zip(parsed, truth)) / len(truth) if truth else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": said_yes / len(parsed) if parsed else 0.0,
    }


# --- multiple choice (V* Bench, HR-Bench) ---------------------------------------------------------------------

# "the answer is (B)." / "Answer: b": the letter ends the sentence (else "the answer is a red car" would be A)
_ANSWER_IS = re.compile(r"\b(?:answer|option|choice)(?:\s+is)?\s*[:\s]\s*\(?([a-z])\)?\s*(?:[.,;!]|$)", re.IGNORECASE)


def parse_option_letter(prediction: str, options: dict[str, str]) -> str | None:
    """The option a free-form answer chose, without a judge model: "the answer is X"; else exactly one option
    letter standing alone ("B", "(B)", "B.", "B) red"); else exactly one option whose text the answer contains.
    None when nothing, or more than one option, fits."""
    text = _text(prediction).strip()
    said = _ANSWER_IS.search(text)
    if said and said.group(1).upper() in options:
        return said.group(1).upper()
    words = set(re.sub(r"[.()\[\],:;!*#{}]", " ", text).split())
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    if letters:
        return None
    lowered = text.lower()
    named = [letter for letter, option in options.items() if str(option).strip() and str(option).lower() in lowered]
    return named[0] if len(named) == 1 else None


def multiple_choice_accuracy(predictions: Sequence[str], options: Sequence[dict[str, str]], answers: Sequence[str]):
    """The share of predictions whose parsed letter is the answer letter."""
    right = [parse_option_letter(p, o) == str(a).strip().upper() for p, o, a in zip(predictions, options, answers)]
    return sum(right) / len(right) if right else 0.0


# --- exact match (toy world, generic JSONL) -------------------------------------------------------------------


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 when the prediction equals an answer, ignoring case and surrounding whitespace."""
    predicted = _text(prediction).strip().lower()
    return float(any(predicted == str(answer).strip().lower() for answer in answers))


def _text(prediction) -> str:
    """A model's output as text; anything else (None, a number from a broken file) as the empty answer."""
    return prediction if isinstance(prediction, str) else ""
