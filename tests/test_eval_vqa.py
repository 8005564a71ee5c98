"""The official VQA accuracy: answer normalisation rules and the leave-one-out average."""
import pytest

from fastvlp.eval.vqa_accuracy import normalize_vqa_answer, vqa_accuracy, vqa_accuracy_score


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),  # number word to digit, period dropped
        ("A dog", "dog"),  # articles removed
        ("the  an apple", "apple"),
        ("dont know", "don't know"),  # apostrophe-less contraction restored
        ("itll rain", "it'll rain"),
        ("it's", "it's"),  # already contracted: unchanged
        ("couldnt've", "couldn't've"),
        ("yes, sir!", "yes sir"),  # punctuation next to a space is dropped
        ("red-white", "red white"),  # punctuation between words becomes a space
        ("1,000", "1000"),  # digit-comma-digit: every listed mark is dropped
        ("3.5", "3.5"),  # a period before a digit stays
        ("None\tat all\n", "0 at all"),
        ("Yes", "yes"),
    ],
)
def test_normalisation_rules(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_leave_one_out_average():
    # 2 of 10 annotators match. Leaving out one of the 2: 1 match left -> 1/3 (twice);
    # leaving out one of the other 8: 2 matches -> 2/3 (8 times). (2/3 + 16/3) / 10 = 0.6.
    answers = ["2"] * 2 + ["3"] * 8
    assert vqa_accuracy("2", answers) == pytest.approx(0.6)
    # 3 of 10: 3 x 2/3 + 7 x 1 = 9 -> 0.9; 4 or more of 10 -> 1.0; 1 of 10: 9 x 1/3 / 10 = 0.3.
    assert vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("5", ["2"] * 10) == 0.0


def test_matching_after_normalisation():
    # "Two dogs." and "2 dogs" are the same answer once normalised (annotators disagree: rules apply).
    answers = ["2 dogs"] * 3 + ["dogs"] * 7
    assert vqa_accuracy("Two dogs.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("the dogs", answers) == pytest.approx(1.0)
    assert vqa_accuracy("DOGS", answers) == pytest.approx(1.0)


def test_official_rules_apply_only_when_annotators_disagree():
    # With ten identical answers the official script compares the stripped strings only, case included.
    answers = ["2 dogs"] * 10
    assert vqa_accuracy("Two dogs.", answers) == 0.0
    assert vqa_accuracy(" 2 dogs\n", answers) == 1.0
    assert vqa_accuracy(" 2 DOGS\n", answers) == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0 and vqa_accuracy("\tYes", ["Yes"] * 10) == 1.0
    assert vqa_accuracy("Two dogs.", answers, normalize="always") == 1.0
    assert vqa_accuracy(" 2 DOGS\n", answers, normalize="always") == 1.0  # the normalisation lower-cases
    # One dissenting annotator turns the rules on, lower-casing included: 9 matches of 10.
    assert vqa_accuracy(" 2 DOGS\n", answers[:9] + ["cats"]) == 1.0


def test_batch_score_and_formats():
    annotations = {
        "annotations": [
            {"question_id": 1, "answer_type": "number", "answers": [{"answer": a} for a in ["2"] * 2 + ["3"] * 8]},
            {"question_id": 2, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
            {"question_id": 3, "answer_type": "yes/no", "answers": [{"answer": "no"}] * 10},
        ]
    }
    result = vqa_accuracy_score({1: "two", 2: "yes"}, annotations)
    assert result["accuracy"] == pytest.approx((0.6 + 1.0) / 2)
    assert result["count"] == 2 and result["missing"] == 1
    assert result["per_answer_type"] == pytest.approx({"number": 0.6, "yes/no": 1.0})
    plain = vqa_accuracy_score({1: "3", 3: "yes"}, {1: ["2"] * 2 + ["3"] * 8, 3: ["no"] * 10})
    assert plain["accuracy"] == pytest.approx((1.0 + 0.0) / 2)
    assert "per_answer_type" not in plain


def test_invalid_inputs():
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError, match="prediction"):
        vqa_accuracy(3, ["3"])
    with pytest.raises(ValueError, match="normalize"):
        vqa_accuracy("yes", ["yes"], normalize="sometimes")
    with pytest.raises(ValueError, match="predictions"):
        vqa_accuracy_score({9: "yes"}, {1: ["yes"]})
    with pytest.raises(TypeError, match="text"):
        normalize_vqa_answer(None)
