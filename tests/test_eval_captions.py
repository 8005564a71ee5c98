"""Caption metrics through pycocoevalcap, with Java (PTB tokenizer, METEOR) and without."""
import shutil

import pytest

from fastvlp.eval import caption_metrics
from fastvlp.eval.caption_metrics import caption_scores, distinct_fraction, simple_caption_tokens

REFERENCES = {
    1: ["A dog runs on the grass.", "a brown dog running across a lawn", "The dog is running outside"],
    2: ["Two cats sit on a sofa.", "cats resting on a couch", "two cats on the sofa"],
    3: ["A man rides a bike down the street.", "a person riding a bicycle", "man on a bike in a city"],
}
PERFECT = {image_id: captions[0] for image_id, captions in REFERENCES.items()}
WRONG = {1: "a plate of food on a table", 2: "a red bus parked at the curb", 3: "a kite flying in the blue sky"}


def check_perfect_beats_wrong(perfect, wrong):
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["cider"] > 1.0 > wrong["cider"] >= 0.0
    assert wrong["bleu4"] < 0.1 and wrong["rouge_l"] < perfect["rouge_l"]
    assert perfect["skipped"]["spice"]


def test_simple_tokenizer():
    assert simple_caption_tokens("A Dog's toy, (red) -- isn't it?") == "a dog 's toy red is n't it"
    assert simple_caption_tokens("...") == ""


def test_scores_without_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    assert not caption_metrics.java_available()
    perfect = caption_scores(PERFECT, REFERENCES)
    wrong = caption_scores(WRONG, REFERENCES)
    check_perfect_beats_wrong(perfect, wrong)
    assert perfect["tokenizer"] == "simple" and "meteor" not in perfect
    assert "meteor" in perfect["skipped"] and perfect["notes"]
    with pytest.raises(ValueError, match="use_java"):
        caption_scores(PERFECT, REFERENCES, use_java=True)


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java")
def test_scores_with_java():
    predictions = {1: PERFECT[1], 2: WRONG[2], 3: PERFECT[3]}
    result = caption_scores(predictions, REFERENCES)
    assert result["tokenizer"] == "ptb" and "meteor" not in result["skipped"] and not result["notes"]
    assert 0.0 < result["meteor"] < 1.0
    # The PTB and the simple tokenizer agree on these plain captions, so the other scores agree.
    simple = caption_scores(predictions, REFERENCES, use_java=False)
    for key in ("bleu4", "rouge_l", "cider"):
        assert result[key] == pytest.approx(simple[key], abs=1e-9)


def test_distinct_fraction():
    assert distinct_fraction(["a red circle", "A  red circle", "a blue square"]) == pytest.approx(2 / 3)
    assert distinct_fraction(["one caption"] * 5) == pytest.approx(1 / 5)
    assert caption_scores(PERFECT, REFERENCES, use_java=False)["distinct"] == 1.0
    constant = caption_scores({i: "a dog" for i in REFERENCES}, REFERENCES, use_java=False)
    assert constant["distinct"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="captions"):
        distinct_fraction([])
    with pytest.raises(TypeError, match="captions"):
        distinct_fraction("a dog")


def test_partial_predictions_and_invalid_inputs():
    partial = caption_scores({1: PERFECT[1], 2: PERFECT[2]}, REFERENCES, use_java=False)
    assert partial["bleu4"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="references"):
        caption_scores({4: "a dog"}, REFERENCES, use_java=False)
    with pytest.raises(ValueError, match="predictions"):
        caption_scores({}, REFERENCES, use_java=False)
    with pytest.raises(TypeError, match="predictions"):
        caption_scores({1: ["a dog"]}, REFERENCES, use_java=False)
    with pytest.raises(ValueError, match="references"):
        caption_scores({1: "a dog"}, {1: []}, use_java=False)
