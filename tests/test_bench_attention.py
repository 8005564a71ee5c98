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
        # Modules are not kernel peers, unavailable peers have no time, a wrong result never counts.
        {"name": "E", "dropout_p": 0.0, "mode": "fwd", "contender": "torch-mha-detr (module, reference only)",
         "median_ms": 1.0},
        {"name": "E", "dropout_p": 0.0, "mode": "fwd", "contender": "xformers", "median_ms": None},
        {"name": "E", "dropout_p": 0.0, "mode": "fwd", "contender": "sdpa-math", "median_ms": 0.5,
         "status": "wrong result: max_abs_diff_vs_reference 0.9 > 0.01"},
        {"name": "X", "dropout_p": 0.1, "mode": "fwd+bwd", "contender": "fastvlp", "median_ms": 4.0},
        {"name": "X", "dropout_p": 0.1, "mode": "fwd+bwd", "contender": "sdpa-cudnn", "median_ms": 2.0},
        # The module ratio is against torch's module called the same way, never against DETR's call.
        {"name": "X", "dropout_p": 0.1, "mode": "fwd+bwd", "contender": "fastvlp-mha (module)", "median_ms": 5.0},
        {"name": "X", "dropout_p": 0.1, "mode": "fwd+bwd", "contender": "torch-mha (module)", "median_ms": 6.0},
        {"name": "X", "dropout_p": 0.1, "mode": "fwd+bwd", "contender": "torch-mha-detr (module, reference only)",
         "median_ms": 9.0},
    ]
    lines = attention.speedup_summary(rows).splitlines()[1:]
    assert len(lines) == 4
    assert lines[0].split()[3:] == ["2.000", "sdpa-cudnn", "3.000", "1.50x"]
    assert lines[1].split()[3:] == ["4.000", "sdpa-cudnn", "2.000", "0.50x"]
    assert lines[2].startswith("modules")
    assert lines[3].split()[3:] == ["5.000", "torch-mha", "(module)", "6.000", "1.20x"]


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
    assert all(row["host_us"] > 0 and row["device_us"] > 0 and row["latency_us"] > 0 for row in rows)
    assert all(row["device_us"] == pytest.approx(row["median_ms"] * 1e3) for row in rows)
    # Device time excludes the host's issue time that the per-call-synchronised latency includes.
    launchers = next(row for row in rows if row["contender"] == "fastvlp-kernel-launchers" and row["mode"] == "fwd")
    assert launchers["device_us"] <= launchers["latency_us"]


@pytest.mark.parametrize("scenario", attention.scenarios(), ids=lambda scenario: scenario["name"])
def test_fastvlp_module_row_calls_the_fused_path(scenario):
    from fastvlp.nn.multihead_attention import MultiheadAttention

    width = scenario["heads"] * scenario["head_dim"]
    module = MultiheadAttention(width, scenario["heads"], dropout=0.1).train()
    batch, query_length, key_length = scenario["batch"], scenario["query_length"], scenario["key_length"]
    # The path depends on shapes, dtypes and flags, not on values: broadcast views keep the big scenarios cheap.
    query = torch.randn(width).expand(query_length, batch, width)
    key = torch.randn(width).expand(key_length, batch, width)
    for kind in ("fastvlp", "torch"):  # torch's module is called the same way: its fair peer
        arguments = attention._module_arguments(kind, scenario, "cpu")
        assert arguments["need_weights"] is False and arguments["is_causal"] is scenario["causal"]
        assert module.why_not_fast_path(query, key, key, **arguments) is None
    # DETR's call, kept as a reference row only, is the one that would miss it.
    detr = attention._module_arguments("detr", scenario, "cpu")
    assert "need_weights" not in detr and (detr["attn_mask"] is not None) is scenario["causal"]
    assert module.why_not_fast_path(query, key, key, **detr) is not None


@pytest.mark.parametrize("causal", [True, False], ids=["causal-self", "cross"])
def test_module_rows_share_weights_and_compute_the_same_attention(causal, monkeypatch):
    from fastvlp.ops.fmha import dispatch

    generator = torch.Generator().manual_seed(7)
    query_length = 12 if causal else 5
    scenario = dict(name="tiny", batch=3, heads=2, head_dim=8, query_length=query_length, key_length=12,
                    mask=attention.text_padding(3, 12, seed=3), causal=causal)
    # No weights are copied here: every module row of a scenario starts from the same weights.
    fast, fast_call = attention._module_call("fastvlp", scenario, 0.0, "cpu", torch.float32)
    fused_calls = []
    real_attention = dispatch.attention

    def recorded_attention(*args, **kwargs):  # the fused op is what the fastvlp row should time
        fused_calls.append(kwargs["causal"])
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(dispatch, "attention", recorded_attention)
    q, k, v = (torch.randn(3, length, 2, 8, generator=generator) for length in (query_length, 12, 12))
    out = fast_call(q, k, v)
    assert fused_calls == [causal]
    for kind in ("torch", "detr"):
        reference, reference_call = attention._module_call(kind, scenario, 0.0, "cpu", torch.float64)
        assert all(torch.equal(a.double(), b) for a, b in zip(fast.state_dict().values(),
                                                              reference.state_dict().values()))
        expected = reference_call(q.double(), k.double(), v.double())
        assert out.shape == expected.shape == (3, query_length, 2, 8)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- run() on the CPU, tiny shapes

def tiny_scenarios(count=1):
    """Small scenarios with padding (cross) and with causality plus padding (self)."""
    shapes = [dict(query_length=5, key_length=12, causal=False), dict(query_length=12, key_length=12, causal=True)]
    # Padding in both batch rows (7 and 10 valid keys of 12).
    padding = torch.arange(12)[None, :] >= torch.tensor([[7], [10]])
    return [dict(name=f"tiny{index}", batch=2, heads=2, head_dim=8, mask=padding.clone(), **shapes[index % 2])
            for index in range(count)]


def cpu_run(contenders, count=1, **kwargs):
    return attention.run(repeats=kwargs.pop("repeats", 2), warmup=kwargs.pop("warmup", 1), dtype=torch.float32,
                         contenders=contenders, progress=False, device="cpu", scenario_list=tiny_scenarios(count),
                         compile_backend="eager", **kwargs)


def flex_forward_rows(rows):
    return [row for row in rows if row["contender"] == "flex-compiled" and row["dropout_p"] == 0.0
            and row["mode"] == "fwd"]


def test_flex_rows_stay_compiled_in_every_scenario():
    # The limit is cut to 1 so that the shared cache would overflow on the second scenario without a reset.
    with torch._dynamo.config.patch(recompile_limit=1):
        rows = cpu_run(["flex-compiled"], count=2)
    forward = flex_forward_rows(rows)
    assert [row["name"] for row in forward] == ["tiny0", "tiny1"]
    for row in forward:
        assert "status" not in row and len(row["raw_ms"]) == 2, row.get("status")
        assert row["max_abs_diff_vs_reference"] < 1e-4


def test_a_flex_row_that_would_run_uncompiled_is_reported_not_timed(monkeypatch):
    torch._dynamo.reset()  # a clean start, then caches shared across scenarios, as without the per-scenario reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    with torch._dynamo.config.patch(recompile_limit=1):
        rows = cpu_run(["flex-compiled"], count=2)
    first, second = flex_forward_rows(rows)
    assert "status" not in first
    assert second["median_ms"] is None and second["raw_ms"] == []
    assert "recompile limit" in second["status"]


def test_sdpa_gets_its_best_mask_prepared_outside_the_calls(monkeypatch):
    import torch.nn.attention as nn_attention
    import torch.nn.functional as F

    seen, entered = [], []
    real_sdpa, real_kernel = F.scaled_dot_product_attention, nn_attention.sdpa_kernel

    def recorded_sdpa(*args, **kwargs):
        seen.append(kwargs["attn_mask"])
        return real_sdpa(*args, **kwargs)

    def recorded_kernel(*args, **kwargs):
        entered.append(args)
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded_sdpa)
    monkeypatch.setattr(nn_attention, "sdpa_kernel", recorded_kernel)
    rows = cpu_run(["sdpa-math"], count=2, repeats=5, warmup=2)
    masks = [mask for mask in seen if mask is not None]
    assert masks and all(mask.dtype == torch.float32 for mask in masks)  # never a bool converted per call
    assert all(mask.stride(-2) % 16 == 0 for mask in masks)  # aligned: no per-call copy either
    # The backend choice is entered around a row's calls (trial, check, each mode), not per call.
    assert len(entered) <= 2 * 2 * 4 < len(seen)
    builds = [row for row in rows if row["contender"] == "sdpa-mask-build"]
    assert [row["name"] for row in builds] == ["tiny0", "tiny1"] and all(len(row["raw_ms"]) >= 3 for row in builds)
    timed = [row for row in rows if row["contender"] == "sdpa-math" and row["dropout_p"] == 0.0]
    assert all("status" not in row for row in timed)
    assert {row["mode"] for row in timed} == {"fwd", "fwd+bwd"}
    assert all(row.get("max_abs_diff_vs_reference", row.get("max_abs_grad_diff_vs_reference")) < 1e-5
               for row in timed)


@pytest.mark.parametrize("index", [0, 1], ids=["cross-padding", "causal-padding"])
def test_sdpa_mask_forms_match_the_keep_mask_and_the_overhead_benchmark(index):
    from fastvlp.bench import attention_masks

    scenario = tiny_scenarios(2)[index]
    additive, is_causal = attention_masks.sdpa_mask(scenario, "cpu", torch.float16)
    keep = attention_masks.keep_mask(scenario, "cpu")
    expected_shape = (2, 1, 12, 12) if scenario["causal"] else (2, 1, 1, 12)
    assert additive.shape == expected_shape and additive.dtype == torch.float16 and not is_causal
    broadcast = torch.broadcast_to(additive, keep.shape)
    assert torch.equal(broadcast == 0, keep) and torch.isinf(broadcast[~keep]).all()
    # The host-overhead benchmark hands SDPA the very same mask form (not the dense bool mask).
    overhead_mask = attention_overhead.sdpa_default(scenario, "cpu", torch.float16).attn_mask
    assert torch.equal(overhead_mask, additive) and overhead_mask.stride() == additive.stride()
    # And SDPA with it computes the masked attention.
    from fastvlp.ops.fmha.reference import attention_reference

    q, k, v = (torch.randn(2, length, 2, 8, dtype=torch.float64) for length in (scenario["query_length"], 12, 12))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=additive.double()).transpose(1, 2)
    expected = attention_reference(q, k, v, key_padding_mask=scenario["mask"], causal=scenario["causal"])
    torch.testing.assert_close(out, expected)


def test_a_peer_with_a_wrong_result_is_flagged_and_left_out_of_the_ratios(monkeypatch):
    def wrong_peer(scenario, dropout_p, setup):  # ignores the mask: not the scenario's attention
        return attention.Prepared(attention._sdpa_call(None, False, dropout_p))

    monkeypatch.setitem(attention.CONTENDERS, "sdpa-math", wrong_peer)
    rows = cpu_run(["fastvlp", "sdpa-math"])
    by_key = {(row["contender"], row["mode"], row["dropout_p"]): row for row in rows}
    for mode in ("fwd", "fwd+bwd"):
        assert "status" not in by_key[("fastvlp", mode, 0.0)]
        assert by_key[("sdpa-math", mode, 0.0)]["status"].startswith("wrong result")
        assert by_key[("sdpa-math", mode, 0.0)]["raw_ms"]  # timed, but never compared
        # Its dropout rows cannot be checked, and are not trusted either.
        assert by_key[("sdpa-math", mode, 0.1)]["status"].startswith("wrong result at dropout 0")
    # With its only peer wrong, fastvlp has nothing to be compared with.
    assert attention.speedup_summary(rows).splitlines()[1:] == []


def test_module_rows_include_the_fair_torch_peer_and_clear_their_gradients(monkeypatch):
    rows = cpu_run(list(attention.MODULE_ROWS))
    forward = {row["contender"]: row for row in rows if row["dropout_p"] == 0.0 and row["mode"] == "fwd"}
    assert forward["torch-mha (module)"]["need_weights"] is False
    assert forward["fastvlp-mha (module)"]["need_weights"] is False
    assert forward["torch-mha-detr (module, reference only)"]["need_weights"] is True
    assert all(row["max_abs_diff_vs_reference"] < 1e-5 and "status" not in row for row in forward.values())
    summary = attention.speedup_summary(rows)
    assert "torch-mha (module)" in summary and "detr" not in summary


def test_the_attention_cli_marks_files_written_mid_run_as_partial(tmp_path, monkeypatch):
    written = []

    def fake_run(repeats, warmup, dtype, names, contenders, after_scenario):
        rows = [common.result_row("E", "fastvlp", "s", [1.0], mode="fwd", dropout_p=0.0)]
        after_scenario(rows)
        written.append(json.loads((tmp_path / "fake-gpu" / "attention.json").read_text()))
        return rows

    monkeypatch.setattr(attention, "run", fake_run)
    monkeypatch.setattr(attention, "device_name", lambda device: "fake-gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert attention.main(["--out-dir", str(tmp_path), "--repeats", "3"]) == 0
    assert written[0]["complete"] is False
    final = json.loads((tmp_path / "fake-gpu" / "attention.json").read_text())
    assert final["complete"] is True and final["repeats"] == 3 and "provenance" in final


# ---------------------------------------------------------------- timing order, checks and summaries

def test_rotated_starts_each_pass_one_further_along():
    assert attention.rotated("abc", 0) == ["a", "b", "c"]
    assert attention.rotated("abc", 1) == ["b", "c", "a"]
    assert attention.rotated("abc", 5) == ["c", "a", "b"]
    assert attention.rotated([], 3) == []


def test_scenario_names_are_the_scenarios():
    assert tuple(scenario["name"] for scenario in attention.scenarios()) == attention.SCENARIO_NAMES


def test_contenders_are_timed_in_a_rotated_order_and_reported_in_a_fixed_one(monkeypatch):
    built = []
    for name in ("fastvlp", "sdpa-math"):
        def logged(scenario, dropout_p, setup, name=name, builder=attention.CONTENDERS[name]):
            built.append((scenario["name"], dropout_p, name))
            return builder(scenario, dropout_p, setup)
        monkeypatch.setitem(attention.CONTENDERS, name, logged)
    rows = cpu_run(["fastvlp", "sdpa-math"], count=2)
    # Four passes (two scenarios, two dropouts): the first contender timed alternates.
    assert [contender for _, _, contender in built] == ["fastvlp", "sdpa-math", "sdpa-math", "fastvlp"] * 2
    timed = [row for row in rows if row["mode"] != "mask build"]
    for start in range(0, len(timed), 4):  # each pass: fastvlp's two rows, then sdpa-math's
        assert [row["contender"] for row in timed[start:start + 4]] == ["fastvlp"] * 2 + ["sdpa-math"] * 2
    positions = [row["timing_position"] for row in timed if row["contender"] == "fastvlp" and row["mode"] == "fwd"]
    assert positions == [0, 1, 0, 1]


def test_module_rows_count_their_projections_in_tflops():
    rows = cpu_run(["fastvlp", "torch-mha (module)"])
    scenario = tiny_scenarios(1)[0]
    core = 4.0 * scenario["head_dim"] * scenario["heads"] * rows[0]["visible_pairs"]
    projections = 2.0 * 2 * 16 * 16 * (2 * 5 + 2 * 12)  # B=2, E=H*D=16, Lq=5, Lk=12
    assert attention.projection_flops(scenario) == projections
    expected = {("fastvlp", "fwd"): core, ("fastvlp", "fwd+bwd"): 3.5 * core,
                ("torch-mha (module)", "fwd"): core + projections,
                ("torch-mha (module)", "fwd+bwd"): 3.5 * core + 3 * projections}
    for row in rows:
        if row["mode"] != "mask build" and row["dropout_p"] == 0.0:
            flops = row["tflops"] * 1e12 * row["median_ms"] * 1e-3
            assert flops == pytest.approx(expected[row["contender"], row["mode"]], rel=1e-9)


def test_a_gradient_check_that_raises_leaves_the_row_not_checked(monkeypatch):
    def failing_check(*args, **kwargs):
        raise RuntimeError("out of memory in the check")

    monkeypatch.setattr(attention, "_input_gradients", failing_check)
    rows = cpu_run(["fastvlp", "sdpa-math"])
    by_key = {(row["contender"], row["mode"], row["dropout_p"]): row for row in rows}
    for contender in ("fastvlp", "sdpa-math"):
        checked = by_key[(contender, "fwd+bwd", 0.0)]
        assert checked["status"] == "not checked: RuntimeError: out of memory in the check"
        assert checked["raw_ms"] and "checked_against" not in checked  # timed, but not as if checked
        assert "status" not in by_key[(contender, "fwd", 0.0)]
        assert "status" not in by_key[(contender, "fwd+bwd", 0.1)]  # not checked is not a wrong result
    summary = attention.speedup_summary(rows).splitlines()[1:]
    assert [line.split()[:3] for line in summary] == [["tiny0", "0.0", "fwd"], ["tiny0", "0.1", "fwd"],
                                                      ["tiny0", "0.1", "fwd+bwd"]]


def test_speedup_summary_names_rows_that_had_not_settled():
    def row(contender, mode, median_ms, drift):
        return {"name": "E", "dropout_p": 0.0, "mode": mode, "contender": contender, "median_ms": median_ms,
                "drift": drift}

    rows = [row("fastvlp", "fwd", 2.0, 1.40), row("sdpa-cudnn", "fwd", 3.0, 1.01),
            row("fastvlp", "fwd+bwd", 4.0, 1.02), row("sdpa-cudnn", "fwd+bwd", 5.0, 0.98),
            row("sdpa-math", "fwd+bwd", 9.0, 0.5)]
    lines = attention.speedup_summary(rows).splitlines()
    assert lines[1].split()[3:] == ["2.000", "sdpa-cudnn", "3.000", "1.50x", "unsettled:", "fastvlp", "(drift",
                                    "1.40)"]
    # A slower peer that had not settled could have been the best: the ratio names it too.
    assert lines[2].endswith("1.25x  unsettled: sdpa-math (drift 0.50)")
    assert lines[3] == attention.UNSETTLED_FOOTNOTE
    settled = [dict(r, drift=1.0) for r in rows]
    assert not any("unsettled" in line for line in attention.speedup_summary(settled).splitlines())


@pytest.mark.parametrize("arguments, message", [
    (["--scenarios", "E", "Q"], "--scenarios: unknown ['Q']; expected names from E X S C-self C-cross D standard"),
    (["--contenders", "nope"], "--contenders: unknown ['nope']; expected names from fastvlp"),
    (["--warmup", "0"], "--warmup >= 1"),
])
def test_the_attention_cli_rejects_bad_arguments(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        attention.main(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_rejects_unknown_scenario_names():
    with pytest.raises(ValueError, match="names: unknown"):
        attention.run(names=["Q"], device="cpu", scenario_list=tiny_scenarios(1), progress=False)
