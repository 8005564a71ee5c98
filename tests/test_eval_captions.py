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
    assert simple_caption_tokens("A Dog's toy, (red) -- isn't it?") == "a dog 's toy -lrb- red -rrb- is n't it"
    assert simple_caption_tokens("x[y]{z}") == "x -lsb- y -rsb- -lcb- z -rcb-"
    assert simple_caption_tokens("...") == ""
    assert simple_caption_tokens("A close-up of a black-and-white T-shirt.") == "a close-up of a black-and-white t-shirt"
    assert simple_caption_tokens("a Café with naïve art") == "a café with naïve art"
    assert simple_caption_tokens("3.5 m, 1,000 people at 10:30.") == "3.5 m 1,000 people at 10:30"
    assert simple_caption_tokens("a sign that says 'stop' at 5 o'clock") == "a sign that says stop at 5 o'clock"
    assert simple_caption_tokens("The dog’s owner cannot stop, won't stop") == "the dog 's owner can not stop wo n't stop"
    assert simple_caption_tokens("black & white, 50% off!!") == "black & white 50 % off !!"


# Captions on which the Java-free tokenizer must give what the PTB pipeline gives.
TRICKY_CAPTIONS = [
    "A man in a t-shirt.",
    "A close-up of a black-and-white cat",
    "A 10-year-old boy with his mother-in-law on a snow-covered hill",
    "a café with naïve art",
    "Crème brûlée at the ÉCOLE on Straße",
    "a sign that says 'stop'",
    'a sign that says "STOP" in red',
    "“Quoted” and ‘single’ quotes",
    "3.5 meters, 1,000 people at 10:30 pm",
    "a 1.5-liter bottle and 1,000,000 dollars at 12:00:00",
    "It's 5 o'clock",
    "He cannot go and Cannot stop",
    "don't won't can't shouldn't isn't CAN'T",
    "A dog's bone, the dogs' bowls and the 1990's",
    "I'm sure you're right; we've seen they'll go and she'd stay",
    "The dog’s toy isn’t red",
    "a black & white photo of a $5 bill at 50% off",
    "a dog/cat hybrid!!! what?",
    "A man -- on a horse ... riding: fast; yes!",
    "A Dog's toy, -- isn't it?",
    "A dog (brown) sits.",
    "Two [red] cats {big} ( here ) and x(y)z",
    "a sign reads (open",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java (PTB tokenizer)")
def test_simple_tokenizer_agrees_with_the_ptb_pipeline():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(TRICKY_CAPTIONS)})
    expected = [ptb[i][0].split() for i in range(len(TRICKY_CAPTIONS))]
    assert [simple_caption_tokens(c).split() for c in TRICKY_CAPTIONS] == expected


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


# Captions that the tokenisation must handle: case, punctuation, clitics, hyphens, numbers, extra spaces.
AGREEMENT_REFERENCES = {
    11: ["A dog's red ball lies on the grass.", "a red ball next to a sleeping dog", "The dog isn't playing with it"],
    12: ["Two cats sit on a sofa.", "cats  resting on a couch", "two cats on the sofa, side by side"],
    13: ["A man rides a bike down the street!", "a person riding a bicycle (in traffic)", "man on a bike in a city"],
    14: ["a red circle left of a blue square", "The blue square is right of a red circle.", "a circle and a square"],
    15: ["A plate of food: rice, beans and 2 eggs.", "food on a white plate", "a well-cooked breakfast on a plate"],
}
AGREEMENT_PREDICTIONS = {
    11: "A dog's red ball on the grass.",
    12: "two cats on a couch",
    13: "A man riding a bike down the street",
    14: "a red circle left of a blue square",
    15: "a plate of rice and eggs",
}


def direct_scores(gts, res, with_meteor):
    """BLEU-4, ROUGE-L, CIDEr-D (and METEOR) from pycocoevalcap's scorers on tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores = {
        "bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3],
        "rouge_l": Rouge().compute_score(gts, res)[0],
        "cider": Cider().compute_score(gts, res)[0],
    }
    if with_meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            scores["meteor"] = scorer.compute_score(gts, res)[0]
        finally:
            del scorer  # its destructor stops the METEOR jar
    return scores


def assert_scores_agree(ours, direct):
    assert direct["bleu4"] > 0.1 and direct["cider"] > 0.1  # not a comparison of zeros
    for key, value in direct.items():
        assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="needs java (PTB tokenizer)")
def test_scores_equal_pycocoevalcap_run_directly():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in AGREEMENT_REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in AGREEMENT_PREDICTIONS.items()})
    direct = direct_scores(gts, res, with_meteor=True)
    ours = caption_scores(AGREEMENT_PREDICTIONS, AGREEMENT_REFERENCES, use_java=True)
    assert ours["tokenizer"] == "ptb"
    assert_scores_agree(ours, direct)


def test_scores_without_java_equal_pycocoevalcap_scorers_on_simple_tokens():
    gts = {i: [simple_caption_tokens(c) for c in refs] for i, refs in AGREEMENT_REFERENCES.items()}
    res = {i: [simple_caption_tokens(c)] for i, c in AGREEMENT_PREDICTIONS.items()}
    ours = caption_scores(AGREEMENT_PREDICTIONS, AGREEMENT_REFERENCES, use_java=False)
    assert ours["tokenizer"] == "simple" and "meteor" not in ours
    assert_scores_agree(ours, direct_scores(gts, res, with_meteor=False))


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
