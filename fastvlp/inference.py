"""Inference from a fine-tuned checkpoint directory, without the command line.

    from fastvlp.inference import Predictor

    predictor = Predictor.from_checkpoint("runs/vqa/checkpoints/step-300")
    predictor.predict("photo.jpg", text="what colour is the circle?")  # {"answers": [...]}
    predictor.evaluate("data/", split="val").metrics                    # {"accuracy": ...}

A captioning checkpoint also takes ``num_beams`` (1 decodes greedily) and ``max_length``.

The task (``task.json``), configuration, tokenizer and weights all come from the checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_model

from fastvlp.data.images import load_rgb_image
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import ScaleConfig, eval_transform
from fastvlp.models.config import E2EVLPConfig
from fastvlp.train.finetune import CONFIG_FILE, TASK_FILE, read_task_file, saved_scale, saved_task_state
from fastvlp.train.loop import checked_device
from fastvlp.train.pretrain_data import TOKENIZER
from fastvlp.train.tasks import get_task
from fastvlp.train.tasks.base import EvaluationResult

ImageLike = Union[str, Path, Image.Image]
TWO_IMAGE_TASKS = ("nlvr2",)  # the tasks that take image2
TEXTLESS_TASKS = ("caption",)  # the tasks that take no text
GENERATION_TASKS = ("caption",)  # the tasks that take num_beams and max_length
TOP_K_TASKS = ("vqa", "detection")  # the tasks that take top_k: answers, boxes
DEFAULT_TOP_K = 5


class Predictor:
    """A fine-tuned model with its task, tokenizer and image transform, ready for :meth:`predict` and
    :meth:`evaluate`. Build it with :meth:`from_checkpoint`."""

    def __init__(self, task, model, tokenizer: WordPieceTokenizer, scale: Union[str, ScaleConfig],
                 device: torch.device) -> None:
        self.task, self.model, self.tokenizer, self.scale, self.device = task, model, tokenizer, scale, device
        self.transform = eval_transform(scale)

    @classmethod
    def from_checkpoint(cls, checkpoint: Union[str, Path], device: Optional[Union[str, torch.device]] = None,
                        attention_backend: Optional[str] = None, expected_task: Optional[str] = None) -> "Predictor":
        """Load ``checkpoint`` (a ``checkpoints/step-N`` directory of ``fastvlp finetune``) on ``device``
        (default: CUDA when available, else the CPU; a device this machine lacks is a ValueError).
        ``expected_task``, when given, must be the checkpoint's task."""
        device = checked_device(device)
        checkpoint = Path(checkpoint)
        missing = [name for name in (TASK_FILE, CONFIG_FILE, TOKENIZER, "model.safetensors") if not (checkpoint / name).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint: {checkpoint} is not a fine-tuned checkpoint (no {', '.join(missing)})")
        saved = read_task_file(checkpoint)
        if expected_task is not None and saved.get("task") != expected_task:
            raise ValueError(f"task: {expected_task}, but {checkpoint} was fine-tuned for {saved.get('task')}")
        task = get_task(saved.get("task"))
        config = E2EVLPConfig.from_json((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        if attention_backend is not None:
            config = config.replace(attention_backend=attention_backend)
        state = saved_task_state(saved)
        model = task.build_model(config, state)
        try:
            load_model(model, str(checkpoint / "model.safetensors"), strict=True)
        except (SafetensorError, RuntimeError) as error:  # a damaged file, or weights of another model
            first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ValueError(f"checkpoint: {checkpoint / 'model.safetensors'} does not hold the weights its "
                             f"{CONFIG_FILE} and {TASK_FILE} describe ({first_line})") from None
        model.to(device).eval()
        tokenizer = WordPieceTokenizer.load(checkpoint / TOKENIZER)
        return cls(task, model, tokenizer, saved_scale(saved), device)

    def _image(self, image: ImageLike, argument: str):
        if isinstance(image, (str, Path)):
            image = load_rgb_image(Path(image))
        if not isinstance(image, Image.Image):
            raise TypeError(f"{argument}: expected a path or a PIL image, got {type(image).__name__}")
        out = self.transform(image.convert("RGB"))
        return out.image, tuple(out.original_size)

    def _generation(self, num_beams: Optional[int], max_length: Optional[int]) -> Dict[str, int]:
        """The decoding options given (None: the task's default), refused for a task that generates nothing."""
        given = {name: value for name, value in (("num_beams", num_beams), ("max_length", max_length))
                 if value is not None}
        if given and self.task.name not in GENERATION_TASKS:
            raise ValueError(f"{next(iter(given))}: expected none for the {self.task.name} task "
                             f"(only {', '.join(GENERATION_TASKS)} generates text)")
        return given

    def predict(self, image: ImageLike, *, image2: Optional[ImageLike] = None, text: Optional[str] = None,
                top_k: Optional[int] = None, num_beams: Optional[int] = None,
                max_length: Optional[int] = None) -> Dict[str, Any]:
        """The task's prediction for one example (see ``fastvlp predict --help`` for each task's output).
        ``image2``: NLVR2's right image (needed there, refused elsewhere); ``text``: refused by captioning,
        and by a detection checkpoint fine-tuned without text. ``top_k`` (default 5): VQA's answers and
        detection's boxes, the highest-scoring first; refused by the other tasks. ``num_beams`` (default 4,
        1 is greedy) and ``max_length`` (default 20, or the model's ``max_text_len`` when shorter):
        captioning only."""
        name = self.task.name
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
            if name not in TOP_K_TASKS:
                raise ValueError(f"top_k: expected none for the {name} task "
                                 f"(only {' and '.join(TOP_K_TASKS)} rank their outputs)")
        top_k = DEFAULT_TOP_K if top_k is None else top_k
        if text is not None and not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        if name == "detection" and text is not None and not getattr(self.model, "with_text", True):
            raise ValueError("text: expected none for this detection checkpoint, which was fine-tuned without "
                             "text (--no-text) and encodes the image alone")
        if name in TWO_IMAGE_TASKS and image2 is None:
            raise ValueError(f"image2: expected the right image, which the {name} task needs, got None")
        if name not in TWO_IMAGE_TASKS and image2 is not None:
            raise ValueError(f"image2: expected none for the {name} task "
                             f"(only {', '.join(TWO_IMAGE_TASKS)} takes a second image)")
        if name in TEXTLESS_TASKS and text is not None:
            raise ValueError(f"text: expected none for the {name} task, which takes no text")
        generation = self._generation(num_beams, max_length)
        pixels, size = self._image(image, "image")
        images, sizes = [pixels], [size]
        if image2 is not None:
            pixels2, size2 = self._image(image2, "image2")
            images.append(pixels2)
            sizes.append(size2)
        with torch.inference_mode():
            return self.task.predict(self.model, self.tokenizer, images, sizes, text, top_k, **generation)

    def evaluate(self, data: Union[str, Path], split: Optional[str] = None, batch_size: int = 16, *,
                 num_beams: Optional[int] = None, max_length: Optional[int] = None) -> EvaluationResult:
        """The task's metrics on ``split`` (default: the task's evaluation split) of the data under ``data``.
        ``num_beams`` and ``max_length``: captioning only, as in :meth:`predict`."""
        if not Path(data).is_dir():
            raise FileNotFoundError(f"data: no such directory: {data}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        generation = self._generation(num_beams, max_length)
        return self.task.evaluate(self.model, self.tokenizer, Path(data), split or self.task.eval_split, self.device,
                                  batch_size, self.scale, **generation)
