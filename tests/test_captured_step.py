"""The captured training step: the same steps as the eager loop, on CUDA; clear errors everywhere; and the host
read recorder that shows, without a GPU, that a step can be captured."""
import pytest
import torch

from fastvlp.bench.train_step import synthetic_batch
from fastvlp.models import E2EVLP, get_preset
from fastvlp.train.captured_step import CapturedTrainingStep, batch_tensors
from fastvlp.train.host_reads import HostReadRecorder
from fastvlp.train.optim import build_optimizer


def _static_batches(model, count, batch_size=4, size=(64, 96), device="cpu", seed=1):
    generator = torch.Generator().manual_seed(seed)
    batches = [synthetic_batch(model.config, batch_size, *size, generator, "cpu") for _ in range(count)]
    largest = max(len(target["labels"]) for batch in batches for target in batch.targets)
    return [model.static_batch(batch, largest).to(device) for batch in batches]


def test_capture_needs_a_cuda_model_and_the_batched_solver():
    torch.manual_seed(0)
    model = E2EVLP(get_preset("tiny", matcher_backend="fastvlp"))
    batch = _static_batches(model, 1)[0]
    with pytest.raises(ValueError, match="model: a captured step needs a model on a CUDA device"):
        CapturedTrainingStep(model, build_optimizer(model), batch)


def test_batch_tensors_names_the_padded_targets():
    torch.manual_seed(0)
    model = E2EVLP(get_preset("tiny", matcher_backend="fastvlp"))
    names = set(batch_tensors(_static_batches(model, 1)[0]))
    assert {"images", "pixel_mask", "input_ids", "detection_rows", "padded_targets.labels", "padded_targets.boxes",
            "padded_targets.counts", "padded_targets.attributes"} <= names
    assert "targets" not in names


def test_host_read_recorder_sees_reads_and_nothing_else():
    values = torch.randn(8)
    original_tolist = torch.Tensor.tolist
    with HostReadRecorder() as recorder:
        (values * 2 + 1).relu().sum()
    assert recorder.records == []
    with HostReadRecorder() as recorder:
        values.sum().item()
        (values > 0).tolist()
        values[values > 0]
        torch.nonzero(values > 0)
        torch.tensor([1, 2, 3])
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 0, 2]))
    kinds = [record.split(":")[0] for record in recorder.records]
    assert kinds.count("aten._local_scalar_dense") == 1 and "Tensor.tolist" in kinds
    assert "aten.index" in kinds and "aten.nonzero" in kinds and "aten.repeat_interleave" in kinds
    assert kinds.count("aten.lift_fresh") == 2
    assert all("test_captured_step.py" in record for record in recorder.records)
    assert torch.Tensor.tolist is original_tolist  # restored on exit


def _eager_step(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    output = model(batch)
    output.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), model.config.clip_max_norm)
    optimizer.step()
    return output


@pytest.mark.cuda
def test_captured_step_replays_the_eager_steps():
    torch.manual_seed(0)
    config = get_preset("tiny", attention_backend="fastvlp", matcher_backend="fastvlp")
    eager = E2EVLP(config).cuda().train()
    graphed = E2EVLP(config).cuda().train()
    graphed.load_state_dict(eager.state_dict())
    start = {name: value.clone() for name, value in eager.state_dict().items()}
    batches = _static_batches(eager, 3, device="cuda")
    eager_optimizer, graphed_optimizer = build_optimizer(eager), build_optimizer(graphed)
    captured = CapturedTrainingStep(graphed, graphed_optimizer, batches[0], clip_max_norm=config.clip_max_norm,
                                    warmup_steps=2)
    for name, value in graphed.state_dict().items():  # the warm-up's steps were undone
        torch.testing.assert_close(value, start[name], rtol=0, atol=0, msg=name)
    for batch in batches:
        expected = _eager_step(eager, eager_optimizer, batch)
        replayed = captured.step(batch)
        for name, value in expected.losses.items():
            torch.testing.assert_close(replayed.losses[name], value, rtol=1e-4, atol=1e-5, msg=name)
    moved = max((eager.state_dict()[name].float() - start[name].float()).abs().max().item()
                for name in start if start[name].is_floating_point())
    apart = max((graphed.state_dict()[name].float() - eager.state_dict()[name].float()).abs().max().item()
                for name in start if start[name].is_floating_point())
    assert moved > 0 and apart < 0.1 * moved, (moved, apart)
    other = _static_batches(eager, 1, size=(64, 128), device="cuda")[0]
    with pytest.raises(ValueError, match="batch.images"):
        captured.step(other)


class _CpuGraphStandIn:
    """What the captured step needs of torch.cuda, on the CPU: capture records nothing and runs nothing (as a real
    capture runs no kernel), and ``replay()`` runs the step the capture would have recorded on the graph's inputs.
    Everything else the class does (warm-up and its undoing, input checks and copies) runs for real."""

    def __init__(self, monkeypatch):
        import contextlib

        import fastvlp.train.captured_step as captured_step

        self.capturing = False
        real_step = captured_step.CapturedTrainingStep._eager_step
        stand_in = self

        class Graph:
            def replay(self):
                owner = stand_in.owner
                owner.model.zero_grad(set_to_none=True)  # a replayed backward writes the gradients afresh
                owner.output, owner.grad_norm = real_step(owner, owner.static)

        @contextlib.contextmanager
        def graph(_graph, **_kwargs):
            self.capturing = True
            yield
            self.capturing = False

        def eager_step(owner, batch):
            if self.capturing:
                self.owner = owner
                return None, None
            return real_step(owner, batch)

        class Stream:
            def __init__(self, *args):
                pass

            def wait_stream(self, other):
                pass

        monkeypatch.setattr(captured_step, "_check_capturable", lambda model, optimizer, example: torch.device("cpu"))
        monkeypatch.setattr(captured_step.CapturedTrainingStep, "_eager_step", eager_step)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: Stream())
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *args: torch.get_rng_state())
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, *args: torch.set_rng_state(state))


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_capture_undoes_its_warm_up_and_replays_on_the_new_inputs(monkeypatch, with_optimizer):
    """On the CPU, with the graph itself stood in for: the warm-up's steps leave no trace in the weights, the
    optimizer or the random generator, and each replay runs on the batch copied in, as the eager loop would."""
    _CpuGraphStandIn(monkeypatch)
    torch.manual_seed(0)
    config = get_preset("tiny", attention_backend="fastvlp", matcher_backend="fastvlp")
    eager, graphed = E2EVLP(config).train(), E2EVLP(config).train()
    graphed.load_state_dict(eager.state_dict())
    start = {name: value.clone() for name, value in eager.state_dict().items()}
    batches = _static_batches(eager, 3)
    eager_optimizer, graphed_optimizer = build_optimizer(eager), build_optimizer(graphed)
    rng = torch.get_rng_state()
    captured = CapturedTrainingStep(graphed, graphed_optimizer if with_optimizer else None, batches[0],
                                    clip_max_norm=config.clip_max_norm, warmup_steps=2)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in graphed.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert all(float(state["step"]) == 0 for state in graphed_optimizer.state.values())
    assert graphed.criterion.matcher.check_finite  # back on after the capture
    for batch in batches:
        expected = _eager_step(eager, eager_optimizer, batch)
        replayed = captured.step(batch)
        torch.testing.assert_close(replayed.loss, expected.loss, rtol=1e-5, atol=1e-6)
        if not with_optimizer:  # the caller steps: the graph leaves the clipped gradients in .grad
            for (name, mine), theirs in zip(graphed.named_parameters(), eager.parameters()):
                if theirs.grad is not None:
                    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)
            graphed_optimizer.step()
    for name, value in graphed.state_dict().items():
        torch.testing.assert_close(value, eager.state_dict()[name], rtol=1e-4, atol=1e-5, msg=name)
    wrong = _static_batches(eager, 1, size=(64, 128))[0]
    assert not captured.accepts(wrong) and captured.accepts(batches[1])
    with pytest.raises(ValueError, match=r"batch.images: .* differs from the captured"):
        captured.step(wrong)
    with pytest.raises(ValueError, match="batch: has no detection_rows"):
        captured.step(type(wrong)(**{**vars(batches[1]), "detection_rows": None, "padded_targets": None}))
