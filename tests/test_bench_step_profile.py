"""The training step's kernel profile: kernels classed by name, summed per step, and the speed-up ceiling."""
import pytest
import torch

from fastvlp.bench import step_profile

# Kernel names as the profiler reports them on an H100 (torch 2.11, Triton 3.6, cuDNN 9.19).
NAMES = {
    "attention_forward_kernel": "attention",
    "attention_backward_dkdv_kernel": "attention",
    "attention_backward_dq_kernel": "attention",
    "attention_backward_delta_kernel": "attention",
    "fmha_cutlassF_f16_aligned_64x64_rf_sm80": "attention",
    "fmha_cutlassB_f16_aligned_64x64_k32_sm80": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<32, 128, 128, 4, false, false, cutlass::half_t>>": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "attention",
    "lsap_kernel(SolverParams)": "matcher",
    "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "other",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>": "other",
}


def test_kernels_are_classed_by_name():
    assert {name: step_profile.kernel_kind(name) for name in NAMES} == NAMES


def test_summary_per_step_by_kind_and_heaviest_first():
    kernels = [("attention_forward_kernel", 300.0), ("attention_forward_kernel", 100.0), ("lsap_kernel", 50.0),
               ("sm90_xmma_fprop_implicit_gemm", 1000.0), ("fill", 10.0)]
    summary = step_profile.summarize_kernels(kernels, steps=2, top=2)
    assert summary["device_ms_per_step"] == {"attention": 0.2, "matcher": 0.025, "other": 0.505}
    assert summary["device_ms_per_step_total"] == pytest.approx(0.73)
    assert summary["heaviest_kernels"] == [
        {"name": "sm90_xmma_fprop_implicit_gemm", "kind": "other", "ms_per_step": 0.5},
        {"name": "attention_forward_kernel", "kind": "attention", "ms_per_step": 0.2},
    ]
    with pytest.raises(ValueError, match="steps"):
        step_profile.summarize_kernels(kernels, steps=0)


def test_the_ceiling_of_a_speedup_that_changes_attention_and_matching_only():
    assert step_profile.attention_bound(365.0, 40.0, 8.0) == pytest.approx(365.0 / 317.0)
    assert step_profile.attention_bound(100.0, 0.0) == 1.0
    with pytest.raises(ValueError, match="attention_ms"):
        step_profile.attention_bound(10.0, 8.0, 2.0)


def test_device_spans_of_user_annotations_are_not_counted_as_kernels(monkeypatch):
    """On a GPU the profiler lists a record_function range (the optimiser's step) a second time, as a device-side
    user annotation spanning the kernels inside it: counting it too would add those kernels' time again."""
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        SimpleNamespace(name="Optimizer.step#AdamW.step", device_type=cpu, device_time=0.0, is_user_annotation=True),
        SimpleNamespace(name="Optimizer.step#AdamW.step", device_type=cuda, device_time=900.0,
                        is_user_annotation=True),
        SimpleNamespace(name="multi_tensor_apply_kernel", device_type=cuda, device_time=800.0,
                        is_user_annotation=False),
        SimpleNamespace(name="attention_forward_kernel", device_type=cuda, device_time=200.0,
                        is_user_annotation=False),
        SimpleNamespace(name="aten::mm", device_type=cpu, device_time=0.0, is_user_annotation=False,
                        self_cpu_time_total=40.0),
        SimpleNamespace(name="cudaLaunchKernel", device_type=cpu, device_time=0.0, is_user_annotation=False,
                        self_cpu_time_total=6.0),
    ]

    class FakeProfile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return events

    steps = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    summary = step_profile.profile_steps(steps.append, steps=2, warmup=1)
    assert steps == [0, 1, 2]
    assert [item["name"] for item in summary["heaviest_kernels"]] == ["multi_tensor_apply_kernel",
                                                                      "attention_forward_kernel"]
    assert summary["device_ms_per_step"] == {"attention": 0.1, "matcher": 0.0, "other": 0.4}
    assert summary["device_ms_per_step_total"] == pytest.approx(0.5)
    assert summary["host"]["launches_per_step"] == {"count": 0.5, "ms": 0.003}
    assert summary["host"]["heaviest_host_operations"] == [{"name": "aten::mm", "calls_per_step": 0.5,
                                                            "self_ms_per_step": 0.02}]


def test_host_summary_separates_waits_copies_launches_and_operations():
    calls = [("cudaStreamSynchronize", 900.0), ("cudaDeviceSynchronize", 100.0), ("cudaMemcpyAsync", 50.0),
             ("cudaLaunchKernel", 5.0), ("cuLaunchKernelEx", 7.0), ("cudaLaunchKernel", 5.0),
             ("aten::_local_scalar_dense", 20.0), ("aten::_local_scalar_dense", 30.0),
             ("aten::copy_", 80.0), ("aten::addmm", 60.0), ("cudaGetDevice", 1.0)]
    host = step_profile.summarize_host(calls, steps=2, top=3)
    assert host["synchronizations_per_step"] == {"count": 1.0, "ms": 0.5}
    assert host["copies_per_step"] == {"count": 0.5, "ms": 0.025}
    assert host["launches_per_step"] == {"count": 1.5, "ms": 0.0085}
    assert host["scalar_reads_per_step"] == {"count": 1.0, "ms": 0.025}
    # Runtime calls (cudaGetDevice) are not operations; the rest come heaviest first.
    assert [item["name"] for item in host["heaviest_host_operations"]] == [
        "aten::copy_", "aten::addmm", "aten::_local_scalar_dense"]
    assert step_profile.summarize_host([], steps=1)["synchronizations_per_step"] == {"count": 0.0, "ms": 0.0}
    with pytest.raises(ValueError, match="steps"):
        step_profile.summarize_host(calls, steps=0)
    profile = dict(step_profile.summarize_kernels([("attention_forward_kernel", 100.0)], steps=2), host=host)
    lines = step_profile.format_profile("fastvlp", profile)
    assert "1.0 synchronizations (0.5 ms)" in lines[2] and "2 kernel launches" in lines[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_profiling_needs_a_gpu():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        step_profile.profile_steps(lambda index: None, 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_both_backends_attention_kernels_are_found_in_a_real_step():
    from fastvlp.bench import train_step

    rows = train_step.run("tiny", batch_size=2, image_size=(128, 160), repeats=1, warmup=1, device="cuda",
                          profile_steps=1)
    for row in rows:
        profile = row["kernel_profile"]
        assert profile["device_ms_per_step"]["attention"] > 0, (row["contender"], profile["heaviest_kernels"])
        assert row["speedup_bound_without_attention_and_matcher"] > 1
