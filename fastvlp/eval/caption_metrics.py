"""COCO caption metrics through pycocoevalcap: BLEU-4, METEOR, ROUGE-L and CIDEr (CIDEr-D).

The standard pipeline tokenises with the Stanford PTB tokenizer and scores METEOR with its jar, both in
Java. Without ``java`` the captions are tokenised by :func:`simple_caption_tokens` instead (lower case,
words split from punctuation, punctuation dropped as the PTB pipeline drops it) and METEOR is skipped;
the result's ``notes`` and ``skipped`` say so. Such scores are close to, not equal to, the official
ones. SPICE needs the Stanford CoreNLP models downloaded and is always reported as skipped.
"""
from __future__ import annotations

import re
import shutil
from typing import Dict, List, Mapping, Optional, Sequence, Union

_WORD_OR_CLITIC = re.compile(r"n't|'[a-z]+|[a-z0-9]+(?=n't)|[a-z0-9]+")


def java_available() -> bool:
    """Whether a ``java`` executable is on the PATH (needed by the PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def simple_caption_tokens(caption: str) -> str:
    """Lower-cased words separated by single spaces, punctuation dropped, clitics split off as the PTB
    tokenizer splits them ("dog's" -> "dog 's", "don't" -> "do n't")."""
    if not isinstance(caption, str):
        raise TypeError(f"caption: expected str, got {type(caption).__name__}")
    return " ".join(_WORD_OR_CLITIC.findall(caption.lower()))


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
