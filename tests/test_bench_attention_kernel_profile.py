"""The profiler target for the attention kernels: its argument checks on any machine, the calls on a GPU."""
import pytest
import torch

from fastvlp.bench import attention_kernel_profile as profile


def test_request_checks_name_the_argument():
    assert profile.check_request("E", ["fastvlp", "flex-compiled"])["name"] == "E"
    with pytest.raises(ValueError, match="scenario"):
        profile.check_request("nope", ["fastvlp"])
    with pytest.raises(ValueError, match="contenders"):
        profile.check_request("E", ["fastvlp", "flashattention9"])
    with pytest.raises(ValueError, match="contenders"):  # module rows time projections too, not one kernel
        profile.check_request("E", ["torch-mha (module)"])
    with pytest.raises(ValueError, match="contenders"):
        profile.check_request("E", [])


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exited:
        profile.main(["--contenders", "fastvlp,nope"])
    assert exited.value.code == 2 and "contenders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile.main(["--calls", "0"])
    assert "--calls" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_it_says_so(capsys):
    assert profile.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profiled_calls_run_on_the_gpu():
    scenario = profile.check_request("C-cross", ["fastvlp", "sdpa-math"])
    lines = profile.profile_calls(scenario, ["fastvlp", "sdpa-math"], calls=1, warmup=1)
    assert len(lines) == 2 and all("profiled after" in line for line in lines), lines
