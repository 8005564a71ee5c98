"""``FinetuneOptions.validate``: the options that only some starts and tasks take (``vocab``, the task options,
retrieval's batch size) and a resumed run's ``init``, checked before any work is done."""
import pytest

from fastvlp.cli import main
from fastvlp.models.presets import get_preset
from fastvlp.train.finetune import TASK_OPTIONS, FinetuneOptions, run_finetuning


@pytest.fixture
def data(tmp_path):
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


@pytest.fixture
def init(tmp_path):
    """A directory that passes for a checkpoint (its config.json is all validate reads)."""
    directory = tmp_path / "init"
    directory.mkdir()
    (directory / "config.json").write_text(get_preset("tiny").to_json())
    return directory


def options(data, **changes):
    values = dict(task="vqa", preset="tiny", data=data, out=data.parent / "out", device="cpu")
    values.update(changes)
    return FinetuneOptions(**values)


def test_vocab_goes_with_a_preset_not_an_init(data, init):
    vocab = data.parent / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    options(data, vocab=vocab).validate()
    for resume in (False, True):
        with pytest.raises(ValueError, match=r"^vocab: expected only with preset \(the init checkpoint .* brings its "
                                             r"tokenizer\), got .*vocab\.txt"):
            run_finetuning(options(data, preset=None, init=init, vocab=vocab, resume=resume))
    options(data, preset=None, init=init).validate()
    assert not (data.parent / "out").exists()


@pytest.mark.parametrize("task, key, value, owner", [
    ("retrieval", "num_answers", 8, "vqa"),
    ("caption", "num_answers", 8, "vqa"),
    ("vqa", "with_text", False, "detection"),
    ("nlvr2", "with_text", True, "detection"),
    ("detection", "num_negatives", 2, "retrieval"),
    ("vqa", "num_negatives", 3, "retrieval"),
])
def test_another_tasks_option_is_refused(data, task, key, value, owner):
    with pytest.raises(ValueError, match=f"^{key}: expected only with task '{owner}', got it with task '{task}'"):
        run_finetuning(options(data, task=task, task_options={key: value}))
    assert not (data.parent / "out").exists()


def test_each_task_takes_its_own_options_and_no_unknown_one(data):
    for task, keys in TASK_OPTIONS.items():
        values = {"num_answers": 8, "with_text": False, "num_negatives": 2}
        options(data, task=task, task_options={key: values[key] for key in keys}).validate()
    with pytest.raises(ValueError, match=r"^task_options: expected options of vqa \(\['num_answers'\]\), "
                                         r"got 'answers'"):
        options(data, task_options={"answers": 8}).validate()
    with pytest.raises(ValueError, match=r"^task_options: expected options of caption \(\[\]\), got 'num_beams'"):
        options(data, task="caption", task_options={"num_beams": 4}).validate()


def test_retrieval_needs_two_rows_per_batch(data):
    with pytest.raises(ValueError, match=r"^batch_size: expected at least 2 for retrieval \(its negatives come from "
                                         r"the same batch\), got 1"):
        run_finetuning(options(data, task="retrieval", batch_size=1))
    assert not (data.parent / "out").exists()
    options(data, task="retrieval", batch_size=2).validate()
    options(data, task="vqa", batch_size=1).validate()  # the other tasks train on one row


def test_a_resumed_runs_init_need_not_exist(data, tmp_path):
    moved = tmp_path / "moved"
    options(data, preset=None, init=moved, resume=True).validate()
    with pytest.raises(FileNotFoundError, match="^init: .*moved is not a checkpoint directory"):
        options(data, preset=None, init=moved).validate()


def test_the_triton_backend_on_the_cpu_needs_the_interpreter(data, init, monkeypatch):
    from fastvlp.train import loop

    monkeypatch.setattr(loop, "triton_interpreter_problem", lambda: "the interpreter is off: set TRITON_INTERPRET=1")
    for changes in ({"attention_backend": "triton"}, {"config_overrides": {"attention_backend": "triton"}},
                    {"preset": None, "init": init, "attention_backend": "triton"}):
        with pytest.raises(ValueError, match=r"^attention_backend: 'triton' on the CPU expects Triton's interpreter"):
            options(data, **changes).validate()
    options(data, attention_backend="torch").validate()  # the other backends need no interpreter
    monkeypatch.setattr(loop, "triton_interpreter_problem", lambda: None)
    options(data, attention_backend="triton").validate()


def test_an_unknown_scale_is_refused_naming_the_option(data, capsys):
    with pytest.raises(ValueError, match=r"^scale: expected a ScaleConfig or one of \['paper', 'tiny'\], got 'huge'"):
        options(data, scale="huge").validate()
    options(data, scale="paper").validate()
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--task", "vqa", "--preset", "tiny", "--data", str(data), "--out", str(data.parent / "out"),
              "--scale", "huge"])
    assert stop.value.code == 2 and "argument --scale: invalid choice: 'huge'" in capsys.readouterr().err
    assert not (data.parent / "out").exists()
