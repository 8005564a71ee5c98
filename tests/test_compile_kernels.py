"""scripts/compile_kernels.py: the attention kernels compile for an H100/H200 target on a machine with no GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compile_kernels.py"
KERNELS = ("attention_forward_kernel", "attention_backward_dq_kernel", "attention_backward_dkdv_kernel",
           "attention_backward_delta_kernel", "dropout_keep_kernel")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dtypes", "float16", "--head-dims", "32", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_a_too_small_shared_memory_limit_fails():
    result = _run()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    for kernel in KERNELS:
        assert any(kernel in line for line in compiled), f"{kernel} was not compiled:\n{result.stdout}"
    assert "0 failed; 0 over" in result.stdout
    if "registers not read" not in result.stdout:  # Triton's NVIDIA backend ships cuobjdump
        assert all(" registers (" in line and " B spilled" in line for line in compiled)
        assert any("HGMMA" in line for line in compiled) and "spill registers to local memory" in result.stdout
    # The same kernels against a 1 KB limit, compiled in two processes: the check reports them and fails.
    tight = _run("--max-shared-kb", "1", "--jobs", "2")
    assert tight.returncode == 1 and "over the limit" in tight.stdout
    summary = next(line for line in tight.stdout.splitlines() if "kernels compiled" in line)
    assert summary.startswith(f"{len(compiled)} kernels compiled"), tight.stdout[-2000:]


def test_refuses_to_run_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "unset TRITON_INTERPRET" in result.stderr


def _load_script(monkeypatch):
    import importlib.util

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("compile_kernels_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resource_report_reads_registers_spills_and_tensor_core_instructions(monkeypatch):
    script = _load_script(monkeypatch)
    usage = ("Resource usage:\n Function attention_forward_kernel:\n"
             "  REG:174 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:1048 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    sass = ("        /*1e80*/                   WARPGROUP.ARRIVE ;\n"
            "        /*1e90*/                   HGMMA.64x64x16.F32 R56, gdesc[UR12], RZ, !UPT ;\n")
    found = script.parse_resources(usage, sass, num_warps=4)
    # 174 registers round up to 176: 176 x 128 threads = 22528 a program, two fit in 65536.
    assert found == {"registers": 174, "spill_bytes": 0, "programs_per_sm": 2, "tensor_cores": "HGMMA",
                     "main_loop_instructions": None}
    spilling = script.parse_resources(usage.replace("STACK:0", "STACK:40").replace("REG:174", "REG:168"),
                                      "  HMMA.16816.F32 R4, R8, R12, R4 ;\n", num_warps=4)
    assert spilling == {"registers": 168, "spill_bytes": 40, "programs_per_sm": 3, "tensor_cores": "HMMA",
                        "main_loop_instructions": None}
    assert script.parse_resources(usage, "FFMA R1, R2, R3, R4 ;", num_warps=8)["programs_per_sm"] == 1
    with pytest.raises(ValueError, match="usage"):
        script.parse_resources("no counts here", sass, num_warps=4)



def test_main_loop_is_the_backward_branch_range_with_the_most_matrix_products(monkeypatch):
    script = _load_script(monkeypatch)
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, RZ ;
        /*0020*/                   ISETP.GE.AND P0, PT, R2, 0x4, PT ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   HGMMA.64x64x16.F32 R56, gdesc[UR12], RZ, !UPT ;
        /*0050*/                   MUFU.EX2 R5, R6 ;
        /*0060*/                   HGMMA.64x64x16.F32 R56, gdesc[UR12], R56 ;
        /*0070*/              @!P1 BRA 0x40 ;
        /*0080*/                   BRA 0x90 ;
        /*0090*/                   EXIT ;
    """
    # Two loops: 0x10-0x30 (three instructions, no products) and 0x40-0x70 (four, two products).
    assert script.main_loop_instructions(sass) == 4
    assert script.main_loop_instructions(sass.replace("HGMMA.64x64x16.F32 R56, gdesc[UR12], R56", "FADD R1, R2, R3")
                                         .replace("HGMMA.64x64x16.F32 R56, gdesc[UR12], RZ, !UPT", "FADD R1, R2, R3")) == 4
    assert script.main_loop_instructions("        /*0000*/                   EXIT ;\n") is None
