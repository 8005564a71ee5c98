"""COCO caption metrics through pycocoevalcap: BLEU-4, METEOR, ROUGE-L and CIDEr (CIDEr-D).

The standard pipeline tokenises with the Stanford PTB tokenizer and scores METEOR with its jar, both in
Java. Without ``java`` the captions are tokenised by :func:`simple_caption_tokens` instead, which follows
the PTB pipeline on ordinary captions, and METEOR is skipped; the result's ``notes`` and ``skipped`` say so.
The scores can still differ from the official ones where the captions hold abbreviations ("Dr.", "U.S."),
emoticons or rare contractions. SPICE needs the Stanford CoreNLP models downloaded and is always reported as skipped.
"""
from __future__ import annotations

import re
import shutil
from typing import Dict, List, Mapping, Optional, Sequence, Union

# Words the PTB tokenizer splits in two.
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta", "gimme": "gim me",
                "lemme": "lem me"}
_SPLIT_WORD = re.compile(r"\b(?:" + "|".join(_SPLIT_WORDS) + r")\b")
# Single characters that come out of the PTB pipeline as nothing: the tokens pycocoevalcap drops (its
# PUNCTUATIONS) and the quotes, dashes and ellipsis that the PTB tokenizer turns into them.
_DROPPED = "'\"`.,:;-!?\u2013\u2014\u2026\u00ab\u00bb\u201c\u201d"
# Brackets stay: the PTB tokenizer writes them as -LRB- and the like, and pycocoevalcap lower-cases before it
# drops its PUNCTUATIONS, so "-lrb-" never matches its "-LRB-".
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Runs of \w, joined by a hyphen or a slash, by . , : between digits ("3.5", "1,000", "10:30"), or by an
# apostrophe after a lone d, l, n or o ("o'clock"). A word stops before a final "n't".
_WORD_PART = r"(?:(?!n't(?!\w))\w)+"
_JOINER = r"(?:[-/]|(?<=\d)[.,:](?=\d)|(?<=\b[dlno])'(?=[^\W\d_]{2}))"
_TOKEN = re.compile(
    rf"""(?:'(?:s|re|ve|ll|d|m)|n't)(?!\w)   # clitic: "dog's" -> dog 's, "don't" -> do n't
    | {_WORD_PART}(?:{_JOINER}{_WORD_PART})*
    | [!?]{{2,}} | [*#@<>]+                  # runs the PTB tokenizer keeps as one token
    | [^\w\s{re.escape(_DROPPED)}]           # any other symbol ("&", "%", "$", a bracket) on its own
    """,
    re.VERBOSE,
)


def java_available() -> bool:
    """Whether a ``java`` executable is on the PATH (needed by the PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def simple_caption_tokens(caption: str) -> str:
    """``caption`` tokenised as the PTB pipeline of pycocoevalcap tokenises it, without Java: lower-cased
    tokens separated by single spaces, with punctuation and quotes dropped; hyphenated words ("t-shirt"),
    numbers ("3.5", "1,000", "10:30") and non-ASCII letters kept whole; clitics split off ("dog's" ->
    "dog 's", "don't" -> "do n't", "cannot" -> "can not"); brackets written as the PTB pipeline writes them
    ("(" -> "-lrb-", "]" -> "-rsb-"); other symbols ("&", "%") kept as tokens."""
    if not isinstance(caption, str):
        raise TypeError(f"caption: expected str, got {type(caption).__name__}")
    text = caption.lower().replace("\u2018", "'").replace("\u2019", "'")  # typographic apostrophes
    text = _SPLIT_WORD.sub(lambda match: _SPLIT_WORDS[match.group()], text)
    return " ".join(_BRACKETS.get(token, token) for token in _TOKEN.findall(text))


def _check_inputs(predictions, references):
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError("predictions, references: expected {image_id: caption} and {image_id: [captions]} mappings")
    if not predictions:
        raise ValueError("predictions: expected at least one caption")
    missing = [image_id for image_id in predictions if image_id not in references]
    if missing:
        raise ValueError(f"references: no reference captions for {len(missing)} predicted images, e.g. {missing[0]!r}")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"predictions: image {image_id!r}: expected a caption string, got {type(caption).__name__}")
        captions = references[image_id]
        if isinstance(captions, str) or not isinstance(captions, Sequence) or not captions:
            raise ValueError(f"references: image {image_id!r}: expected a non-empty list of captions")
        if not all(isinstance(reference, str) for reference in captions):
            raise TypeError(f"references: image {image_id!r}: expected caption strings")


def _tokenize(predictions, references, with_java: bool):
    ids = list(predictions)
    if with_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        res = tokenizer.tokenize({image_id: [{"caption": predictions[image_id]}] for image_id in ids})
        gts = tokenizer.tokenize({image_id: [{"caption": c} for c in references[image_id]] for image_id in ids})
    else:
        res = {image_id: [simple_caption_tokens(predictions[image_id])] for image_id in ids}
        gts = {image_id: [simple_caption_tokens(c) for c in references[image_id]] for image_id in ids}
    return gts, res


def _meteor(gts, res) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        # Stop the jar now rather than whenever the scorer is garbage collected.
        process = scorer.meteor_p
        process.stdin.close()
        process.kill()
        process.wait()
        scorer.meteor_p = _Closed()


class _Closed:
    """Stands in for the stopped METEOR process so the scorer's destructor finds nothing left to do."""

    class _Pipe:
        def close(self):
            pass

    stdin = _Pipe()

    def kill(self):
        pass

    def wait(self):
        pass


def distinct_fraction(captions: Sequence[str]) -> float:
    """Distinct captions over captions, after lower-casing and collapsing white space: 1 when every image
    gets its own caption, 1/N when one caption is given for all N (a captioner that ignores the image)."""
    if isinstance(captions, str) or not isinstance(captions, Sequence) or not all(isinstance(c, str) for c in captions):
        raise TypeError("captions: expected a sequence of strings")
    if not captions:
        raise ValueError("captions: expected at least one caption")
    return len({" ".join(c.lower().split()) for c in captions}) / len(captions)


def caption_scores(
    predictions: Mapping[object, str],
    references: Mapping[object, Sequence[str]],
    *,
    use_java: Optional[bool] = None,
) -> Dict[str, Union[float, List[str], Dict[str, str]]]:
    """Corpus-level caption scores of ``predictions`` ``{image_id: caption}`` against ``references``
    ``{image_id: [captions]}`` (the predicted images only).

    Returns ``bleu4``, ``rouge_l`` and ``cider`` (BLEU and ROUGE-L in [0, 1], CIDEr-D unbounded; CIDEr's
    document frequencies come from these references, so it needs more than one image to be non-zero),
    ``distinct`` (:func:`distinct_fraction` of the predictions),
    ``meteor`` when Java runs, ``tokenizer`` (``"ptb"`` or ``"simple"``), ``skipped`` ``{metric:
    reason}`` and ``notes``. ``use_java``: None detects ``java`` on the PATH; False forces the
    Java-free path; True requires Java.
    """
    _check_inputs(predictions, references)
    if use_java is not None and not isinstance(use_java, bool):
        raise TypeError(f"use_java: expected None or bool, got {type(use_java).__name__}")
    found_java = java_available()
    if use_java and not found_java:
        raise ValueError("use_java: True, but no java executable is on the PATH")
    with_java = found_java if use_java is None else use_java

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenize(predictions, references, with_java)
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    result: Dict[str, Union[float, List[str], Dict[str, str]]] = {
        "bleu4": float(bleu[3]),
        "rouge_l": float(Rouge().compute_score(gts, res)[0]),
        "cider": float(Cider().compute_score(gts, res)[0]),
        "distinct": distinct_fraction(list(predictions.values())),
    }
    skipped = {"spice": "needs the Stanford CoreNLP models, which are not downloaded"}
    notes: List[str] = []
    if with_java:
        result["meteor"] = _meteor(gts, res)
    else:
        skipped["meteor"] = "needs java"
        notes.append("no java: captions tokenised by simple_caption_tokens, not the PTB tokenizer; METEOR skipped")
    result.update(tokenizer="ptb" if with_java else "simple", skipped=skipped, notes=notes)
    return result
