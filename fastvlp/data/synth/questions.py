"""VQA questions about a scene, with the answers chosen before the scene is drawn.

`plan_questions` deals the answers from shuffled decks (every colour, over both colour questions; every
count 1..4; every (yes/no kind, answer) pair) equally often, separately within each group of images (each
VQA split), so no answer dominates a split or one of its question types. Each image gets five questions: the
colour of the one object of its kind, a count, the colour of a second single object, a yes/no question
(existence or a left/above relation), and the colour of the background (one of the tints, which no shape
takes; VQA v2 asks "What color is the background?" too, under the same question type as the objects'
colours). The yes/no deck is always dealt out whole, so yes and no are exactly even in each yes/no question
type; the up to three cards beyond one per image become a sixth question of a few images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastvlp.data.synth.palette import BACKGROUNDS, COLOUR_NAMES, SHAPES, number_word, with_article
from fastvlp.data.synth.scene import MAX_COUNTED, MIN_COUNTED, Scene, ScenePlan, is_above, is_left_of

ANSWERS_PER_QUESTION = 10
_YES_NO_DECK = (("existence", "yes"), ("existence", "no"), ("relation", "yes"), ("relation", "no"))


@dataclass(frozen=True)
class SynthQuestion:
    question: str
    question_type: str  # VQA's question prefix, e.g. "what color is the"
    answer_type: str  # "yes/no", "number" or "other", as in VQA v2
    answer: str


@dataclass(frozen=True)
class QuestionPlan:
    scene: ScenePlan
    # (kind, answer) of each yes/no question: kind "existence" or "relation", answer "yes" or "no".
    yes_no: tuple[tuple[str, str], ...]


class _Deck:
    """Deals values from repeatedly shuffled copies of a list: balanced counts, random order."""

    def __init__(self, rng: np.random.Generator, values: tuple) -> None:
        self._rng, self._values, self._pending = rng, values, []

    def deal(self):
        if not self._pending:
            self._pending = [self._values[i] for i in self._rng.permutation(len(self._values))]
        return self._pending.pop()


def plan_questions(rng: np.random.Generator, groups: Sequence[str]) -> list[QuestionPlan]:
    """Answer plans for `len(groups)` images, image i in group `groups[i]`, balanced within every group."""
    if isinstance(groups, str):
        raise TypeError("groups: expected a sequence of group names, one per image, got a str")
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    plans: list[QuestionPlan | None] = [None] * len(groups)
    for group in sorted(members):
        for i, plan in zip(members[group], _plan_group(rng, len(members[group]))):
            plans[i] = plan
    return plans


def _plan_group(rng: np.random.Generator, num_images: int) -> list[QuestionPlan]:
    colours = _Deck(rng, COLOUR_NAMES)
    counts = _Deck(rng, tuple(range(MIN_COUNTED, MAX_COUNTED + 1)))
    num_decks = -(-num_images // len(_YES_NO_DECK))
    cards = [_YES_NO_DECK[i] for _ in range(num_decks) for i in rng.permutation(len(_YES_NO_DECK))]
    yes_no = [[card] for card in cards[:num_images]]
    # Each spare card goes to an image that has no question of its kind yet, so no image is asked the same
    # kind twice; below about eight images there may be no such image, and the card is dropped.
    for kind, answer in cards[num_images:]:
        takers = [q for q in yes_no if len(q) == 1 and q[0][0] != kind]
        if takers:
            takers[int(rng.integers(len(takers)))].append((kind, answer))
    # Both colour questions' answers come from the one deck, so the colours are even over the question type.
    plans = []
    for q in yes_no:
        named_colour, counted = colours.deal(), counts.deal()
        plans.append(QuestionPlan(ScenePlan(named_colour, counted, partner_colour=colours.deal()), tuple(q)))
    return plans


def _existence(rng: np.random.Generator, scene: Scene, answer: str) -> SynthQuestion:
    if answer == "yes":
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        colour, shape = obj.colour, obj.shape
    else:
        absent = [(c, s) for s in SHAPES for c in COLOUR_NAMES if scene.count(s, c) == 0]
        colour, shape = absent[int(rng.integers(len(absent)))]
    return SynthQuestion(f"Is there {with_article(f'{colour} {shape}')}?", "is there a", "yes/no", answer)


def _relation(rng: np.random.Generator, scene: Scene, answer: str) -> SynthQuestion:
    a, b = scene.only(scene.named_shape), scene.only(scene.partner_shape)
    options = []
    if is_left_of(a, b) or is_left_of(b, a):
        first, second = (a, b) if is_left_of(a, b) else (b, a)
        options.append(("to the left of", first, second))
    if is_above(a, b) or is_above(b, a):
        first, second = (a, b) if is_above(a, b) else (b, a)
        options.append(("above", first, second))
    # Non-overlapping boxes are separated along at least one axis, so `options` is never empty.
    relation, first, second = options[int(rng.integers(len(options)))]
    if answer == "no":
        first, second = second, first
    return SynthQuestion(f"Is the {first.shape} {relation} the {second.shape}?", "is the", "yes/no", answer)


def ask_questions(rng: np.random.Generator, scene: Scene, plan: QuestionPlan) -> list[SynthQuestion]:
    """The questions of an image built from `plan` (five, or six with a spare yes/no card); every answer is
    read off the scene."""
    named = scene.only(scene.named_shape)
    partner = scene.only(scene.partner_shape)
    counted = scene.count(scene.counted_shape)
    count_forms = ("How many {}s are there?", "How many {}s are in the picture?", "How many {}s can you see?")
    questions = [
        SynthQuestion(f"What color is the {named.shape}?", "what color is the", "other", named.colour),
        SynthQuestion(
            count_forms[int(rng.integers(len(count_forms)))].format(scene.counted_shape),
            "how many",
            "number",
            str(counted),
        ),
        SynthQuestion(f"What color is the {partner.shape}?", "what color is the", "other", partner.colour),
    ]
    for kind, answer in plan.yes_no:
        make = _existence if kind == "existence" else _relation
        questions.append(make(rng, scene, answer))
    # Last, and drawing nothing from `rng`: the other questions and their annotator answers stay as they were.
    questions.append(
        SynthQuestion("What color is the background?", "what color is the", "other", scene.background_name)
    )
    return questions


def _noisy_answer(rng: np.random.Generator, answer: str, answer_type: str) -> str:
    if answer_type == "yes/no":
        return "no" if answer == "yes" else "yes"
    if answer_type == "number":
        value = int(answer)
        if rng.random() < 0.5:
            return number_word(value)  # the same answer, written out
        return str(value + 1 if value == 0 or rng.random() < 0.5 else value - 1)
    if rng.random() < 0.4:
        return f"{'dark' if rng.random() < 0.5 else 'light'} {answer}"
    names = tuple(BACKGROUNDS) if answer in BACKGROUNDS else COLOUR_NAMES  # a tint is mistaken for a tint
    others = [c for c in names if c != answer]
    return others[int(rng.integers(len(others)))]


def annotator_answers(rng: np.random.Generator, answer: str, answer_type: str) -> list[dict]:
    """Ten VQA-style answers: mostly `answer`, with up to three plausible deviations."""
    num_noisy = int(rng.choice((0, 0, 0, 1, 1, 1, 2, 2, 3)))
    noisy = set(int(i) for i in rng.choice(ANSWERS_PER_QUESTION, size=num_noisy, replace=False))
    answers = []
    for i in range(ANSWERS_PER_QUESTION):
        if i in noisy:
            text, confidence = _noisy_answer(rng, answer, answer_type), str(rng.choice(("maybe", "no", "yes")))
        else:
            text, confidence = answer, ("yes" if rng.random() < 0.9 else "maybe")
        answers.append({"answer": text, "answer_confidence": confidence, "answer_id": i + 1})
    return answers


QUESTION_KINDS = ("background colour", "object colour", "count", "existence", "relation")


def question_kind(question: str) -> str:
    """Which of the synthetic grammar's questions `question` is, one of `QUESTION_KINDS`. VQA's question type
    puts the background's colour and the objects' under one type, and its answer type puts existence and
    relation questions under yes/no: the kinds tell apart what those mix."""
    if not isinstance(question, str):
        raise TypeError(f"question: expected a str, got {type(question).__name__}")
    if question == "What color is the background?":
        return "background colour"
    for prefix, kind in (("What color is the ", "object colour"), ("How many ", "count"),
                         ("Is there ", "existence"), ("Is the ", "relation")):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"question: not one of the synthetic grammar's questions: {question!r}")
