"""The attention benchmarks' CLI checks, their summary, and the version record; the timed runs need a GPU."""
import importlib.metadata
import json

import pytest
import torch

from fastvlp.bench import attention, attention_overhead, common

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")


@needs_no_gpu
@pytest.mark.parametrize("module", [attention, attention_overhead], ids=["attention", "overhead"])
def test_benchmarks_without_a_gpu_say_so(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main([])
    assert exit_info.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("module", [attention, attention_overhead], ids=["attention", "overhead"])
def test_benchmarks_reject_bad_repeats(module, capsys):
    with pytest.raises(SystemExit):
        module.main(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_speedup_summary_compares_with_the_fastest_kernel_peer():
    rows = [
        {"name": "E", "dropout_p": 0.0, "mode": "fwd", "contender": "fastvlp", "median_ms": 2.0},
        {"name": "E", "dropout_p": 0.0, "mode": "fwd", "contender": "sdpa-cudnn", "median_ms": 3.0},
        {"name": "E", "dropout_p": 0.0, "mode": "fwd", "contender": "sdpa-efficient", "median_ms": 5.0},
        # Modules are not kernel peers, and unavailable peers have no time.
        {"name": "E", "dropout_p": 0.0, "mode": "fwd", "contender": "torch-mha-detr (module)", "median_ms": 1.0},
        {"name": "E", "dropout_p": 0.0, "mode": "fwd", "contender": "xformers", "median_ms": None},
        {"name": "X", "dropout_p": 0.1, "mode": "fwd+bwd", "contender": "fastvlp", "median_ms": 4.0},
        {"name": "X", "dropout_p": 0.1, "mode": "fwd+bwd", "contender": "sdpa-cudnn", "median_ms": 2.0},
    ]
    lines = attention.speedup_summary(rows).splitlines()[1:]
    assert len(lines) == 2
    assert lines[0].split()[3:] == ["2.000", "sdpa-cudnn", "3.000", "1.50x"]
    assert lines[1].split()[3:] == ["4.000", "sdpa-cudnn", "2.000", "0.50x"]


def test_versions_name_a_source_tree_run(monkeypatch):
    real_version = importlib.metadata.version

    def version(package):
        if package == "fastvlp":
            raise importlib.metadata.PackageNotFoundError(package)
        return real_version(package)

    monkeypatch.setattr(importlib.metadata, "version", version)
    found = common.versions()
    assert found["fastvlp"].endswith("(source tree, not installed)")
    assert found["torch"] == real_version("torch")
    assert "extension" in json.loads(found["fastvlp_build"])


def test_worker_thread_runs_calls_elsewhere_and_returns_their_errors():
    import threading

    worker = attention_overhead.WorkerThread()
    seen = []
    for _ in range(3):
        worker.run(lambda: seen.append(threading.current_thread().name))
    assert seen == ["attention-overhead-worker"] * 3
    with pytest.raises(ZeroDivisionError):
        worker.run(lambda: 1 / 0)
    worker.run(lambda: seen.append("still serving"))
    assert seen[-1] == "still serving"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overhead_rows_cover_every_contender_and_mode():
    rows = attention_overhead.run(["C-self"], repeats=3, warmup=1)
    seen = {(row["contender"], row["mode"]) for row in rows}
    assert seen == {("fastvlp", "fwd"), ("fastvlp", "fwd+bwd"), ("fastvlp-registered-op", "fwd"),
                    ("fastvlp-registered-op", "fwd+bwd"), ("fastvlp-kernel-launchers", "fwd"),
                    ("fastvlp-kernel-launchers", "bwd"), ("fastvlp-kernel-launchers-worker-thread", "bwd"),
                    ("worker-thread-round-trip", "no-op"), ("sdpa-default", "fwd"), ("sdpa-default", "fwd+bwd")}
    assert all(row["host_us"] > 0 and row["median_ms"] > 0 for row in rows)


@pytest.mark.parametrize("scenario", attention.scenarios(), ids=lambda scenario: scenario["name"])
def test_fastvlp_module_row_calls_the_fused_path(scenario):
    from fastvlp.nn.multihead_attention import MultiheadAttention

    width = scenario["heads"] * scenario["head_dim"]
    module = MultiheadAttention(width, scenario["heads"], dropout=0.1).train()
    batch, query_length, key_length = scenario["batch"], scenario["query_length"], scenario["key_length"]
    # The path depends on shapes, dtypes and flags, not on values: broadcast views keep the big scenarios cheap.
    query = torch.randn(width).expand(query_length, batch, width)
    key = torch.randn(width).expand(key_length, batch, width)
    arguments = attention._module_arguments("fastvlp", scenario, "cpu")
    assert arguments["need_weights"] is False and arguments["is_causal"] is scenario["causal"]
    assert module.why_not_fast_path(query, key, key, **arguments) is None
    # DETR's call, which the torch row keeps, is the one that would miss it.
    detr = attention._module_arguments("torch", scenario, "cpu")
    assert "need_weights" not in detr and (detr["attn_mask"] is not None) is scenario["causal"]
    assert module.why_not_fast_path(query, key, key, **detr) is not None


@pytest.mark.parametrize("causal", [True, False], ids=["causal-self", "cross"])
def test_module_rows_compute_the_same_attention(causal, monkeypatch):
    from fastvlp.ops.fmha import dispatch

    generator = torch.Generator().manual_seed(7)
    query_length = 12 if causal else 5
    scenario = dict(name="tiny", batch=3, heads=2, head_dim=8, query_length=query_length, key_length=12,
                    mask=attention.text_padding(3, 12, seed=3), causal=causal)
    fast, fast_call = attention._module_call("fastvlp", scenario, 0.0, "cpu", torch.float32)
    reference, reference_call = attention._module_call("torch", scenario, 0.0, "cpu", torch.float64)
    reference.load_state_dict({name: value.double() for name, value in fast.state_dict().items()})
    fused_calls = []
    real_attention = dispatch.attention

    def recorded_attention(*args, **kwargs):  # the fused op is what the fastvlp row should time
        fused_calls.append(kwargs["causal"])
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(dispatch, "attention", recorded_attention)
    q, k, v = (torch.randn(3, length, 2, 8, generator=generator) for length in (query_length, 12, 12))
    out = fast_call(q, k, v)
    assert fused_calls == [causal]
    expected = reference_call(q.double(), k.double(), v.double())
    assert out.shape == expected.shape == (3, query_length, 2, 8)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
