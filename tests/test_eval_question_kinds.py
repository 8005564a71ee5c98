"""VQA accuracy by kind of synthetic question, on hand-made records whose figures are worked out by hand."""
import pytest

from fastvlp.data.records import VqaRecord
from fastvlp.eval.question_kinds import accuracy_by_question_kind


def _record(question_id, question, answers, question_type):
    return VqaRecord(question_id, 1, None, question, tuple(answers), answers[0], question_type, "other")


COLOUR = "what color is the"
TRAIN = [
    _record(1, "What color is the circle?", ["red"] * 10, COLOUR),
    _record(2, "What color is the star?", ["red"] * 10, COLOUR),
    _record(3, "What color is the background?", ["cream"] * 10, COLOUR),
    _record(4, "How many stars are there?", ["2"] * 10, "how many"),
]


def test_each_kind_gets_its_accuracy_and_the_question_type_prior_on_its_own_questions():
    val = [
        _record(11, "What color is the background?", ["pink"] * 10, COLOUR),
        _record(12, "What color is the background?", ["cream"] * 10, COLOUR),
        _record(13, "What color is the square?", ["red"] * 9 + ["blue"], COLOUR),
        _record(14, "How many circles are there?", ["3"] * 8 + ["2"] * 2, "how many"),
    ]
    predictions = [{"question_id": 11, "answer": "pink"}, {"question_id": 12, "answer": "pink"},
                   {"question_id": 13, "answer": "blue"}, {"question_id": 14, "answer": "2"}]
    kinds = accuracy_by_question_kind(predictions, val, TRAIN)
    assert list(kinds) == ["background colour", "object colour", "count"]
    # The prior answers "red" to every "what color is the" question and "2" to "how many".
    assert kinds["background colour"] == {"questions": 2, "accuracy": pytest.approx(0.5), "question_type_prior": 0.0}
    # One "blue" among ten answers: 1/3 in the 9 leave-one-out subsets that keep it, 0 in the one without it.
    assert kinds["object colour"]["accuracy"] == pytest.approx(0.3)
    assert kinds["object colour"]["question_type_prior"] == pytest.approx(1.0)
    assert kinds["count"]["accuracy"] == pytest.approx(kinds["count"]["question_type_prior"])
    # Two "2"s: 2/3 in the 8 subsets without a "2" left out, 1/3 in the other 2.
    assert kinds["count"]["accuracy"] == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)


def test_questions_outside_the_grammar_or_the_records_are_refused():
    with pytest.raises(ValueError, match="eval_records"):
        accuracy_by_question_kind([{"question_id": 5, "answer": "yes"}],
                                  [_record(5, "Is it raining?", ["no"] * 10, "is it")], TRAIN)
    with pytest.raises(ValueError, match="predictions"):
        accuracy_by_question_kind([{"question_id": 6, "answer": "red"}], [], TRAIN)
    assert accuracy_by_question_kind([], [], TRAIN) == {}
