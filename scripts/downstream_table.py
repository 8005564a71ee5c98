"""Print the downstream check's table: each task's metrics from OUT/<task>.eval.json next to its target and,
for VQA and captioning, the trivial baselines computed from the data. Runs of further seeds
(OUT/<task>.seed<N>.eval.json) add each seed's value and the mean over all seeds. With the VQA predictions
(OUT/vqa.predictions.json), a second table gives VQA's accuracy for each kind of question of the synthetic
set next to the question-type prior on the same questions.

    python scripts/downstream_table.py OUT DATA
"""
import json
import sys
from pathlib import Path

from fastvlp.data.readers.vqa import read_vqa
from fastvlp.eval.question_kinds import accuracy_by_question_kind
from fastvlp.train.tasks.caption import caption_baseline, read_caption_records
from fastvlp.train.tasks.vqa import vqa_baselines


def main(out: Path, data: Path) -> None:
    metrics, seeded = {}, {}
    for task in ("vqa", "nlvr2", "caption", "retrieval", "detection"):
        path = out / f"{task}.eval.json"
        metrics[task] = json.loads(path.read_text())["metrics"] if path.is_file() else {}
        seeded[task] = [json.loads(p.read_text())["metrics"] for p in sorted(out.glob(f"{task}.seed*.eval.json"))]
    vqa = vqa_baselines(read_vqa(data / "vqa", data / "coco", "train").records,
                        read_vqa(data / "vqa", data / "coco", "val").records)
    caption = caption_baseline(read_caption_records(data, "train").records, read_caption_records(data, "test").records)
    rows = [
        ("vqa", "accuracy", metrics["vqa"].get("accuracy"),
         f">= 2x most frequent answer ({vqa['most_frequent_answer']:.3f}) and 1.25x question-type prior "
         f"({vqa['question_type_prior']:.3f})"),
        ("nlvr2", "accuracy", metrics["nlvr2"].get("accuracy"), ">= 0.65"),
        ("caption", "cider", metrics["caption"].get("cider"), f">= 3x most frequent caption ({caption['cider']:.3f})"),
        ("retrieval", "txt_r5", metrics["retrieval"].get("txt_r5"), ">= 0.15"),
        ("retrieval", "img_r5", metrics["retrieval"].get("img_r5"), ">= 0.15"),
        ("detection", "ap50", metrics["detection"].get("ap50"), ">= 0.2"),
    ]
    print(f"| task | metric | result | target |\n|---|---|---|---|")
    for task, name, value, target in rows:
        shown = "not run" if value is None else f"{value:.3f}"
        others = [m[name] for m in seeded[task] if name in m]
        if value is not None and others:
            values = [value, *others]
            shown += f" (other seeds: {', '.join(f'{v:.3f}' for v in others)}; mean {sum(values) / len(values):.3f})"
        print(f"| {task} | {name} | {shown} | {target} |")
    predictions = out / "vqa.predictions.json"
    if predictions.is_file():
        print_vqa_by_kind(json.loads(predictions.read_text()), data)


def print_vqa_by_kind(predictions, data: Path) -> None:
    """VQA accuracy and the question-type prior's, for each kind of question of the synthetic grammar."""
    kinds = accuracy_by_question_kind(predictions, read_vqa(data / "vqa", data / "coco", "val").records,
                                      read_vqa(data / "vqa", data / "coco", "train").records)
    print("\n| VQA question kind | questions | accuracy | question-type prior |\n|---|---|---|---|")
    for kind, row in kinds.items():
        print(f"| {kind} | {row['questions']} | {row['accuracy']:.3f} | {row['question_type_prior']:.3f} |")

if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/downstream_table.py OUT DATA")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
