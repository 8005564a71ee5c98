"""The attention tile sweep: one tile at a time really runs that tile, results are checked against the
reference, and the summary compares the autotuned tile with the best. Without a GPU the kernels run in
Triton's interpreter on small shapes."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastvlp.bench import attention_tiles  # noqa: E402
from fastvlp.bench.attention import image_text_padding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_runnable():
    if DEVICE == "cuda":
        return True
    from fastvlp.ops.fmha.kernel_config import kernels_interpreted

    return kernels_interpreted()


needs_kernels = pytest.mark.skipif(
    not _kernels_runnable(),
    reason="fastvlp's Triton kernels were imported before TRITON_INTERPRET=1 was set; run this file on its own",
)


def _tiles():
    import triton

    warps = 4 if DEVICE == "cuda" else 1
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=warps, num_stages=1),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=warps, num_stages=1)]


def _small_scenario():
    # 10 text tokens and a 5x9 image grid: 55 keys, with padding inside the image rows; 37 queries.
    mask = image_text_padding(2, text_tokens=10, height=5, width=9, seed=3)
    assert mask.any() and not mask.all(dim=1).any()
    return dict(name="small", batch=2, heads=2, head_dim=16, query_length=37, key_length=55, mask=mask,
                causal=False)


@needs_kernels
def test_sweep_runs_each_tile_and_checks_it_against_the_reference():
    from fastvlp.ops.fmha.forward_kernel import attention_forward_kernel

    tuned_before = (attention_forward_kernel.configs, attention_forward_kernel.cache)
    rows = attention_tiles.run(["small"], dropouts=(0.0, 0.25), repeats=1, warmup=0, dtype=torch.float32,
                               device=DEVICE, scenario_list=[_small_scenario()], tiles=_tiles(), progress=False)
    # The library's autotuner state is back as it was.
    assert attention_forward_kernel.configs is tuned_before[0] and attention_forward_kernel.cache is tuned_before[1]
    swept = {"16x32 w%d s1" % (4 if DEVICE == "cuda" else 1), "32x16 w%d s1" % (4 if DEVICE == "cuda" else 1)}
    for group_index, (dropout_p, kernel) in enumerate((p, kernel) for p in (0.0, 0.25)
                                                      for kernel in attention_tiles.KERNELS):
        group = [row for row in rows if row["kernel"] == kernel and row["dropout_p"] == dropout_p]
        tiles = [row["tile"] for row in group]
        assert set(tiles[:2]) == swept and tiles[2].startswith("autotuned: "), tiles
        # Each group is timed one further along the list, so no run is always first; rows keep the list's order.
        assert [row["timing_position"] for row in group] == [(index - group_index) % 3 for index in range(3)]
        for row in group:
            assert "status" not in row, row.get("status")
            assert row["median_ms"] > 0 and len(row["raw_ms"]) == 1
            # float32 kernels against the float32 reference with the same dropout mask
            assert row["max_abs_diff_vs_reference"] < 1e-4
        assert all(isinstance(row["kept_by_pruning"], bool) for row in group[:2])


@needs_kernels
def test_only_tile_launches_the_tile_it_names():
    from fastvlp.ops.fmha.dispatch import attention
    from fastvlp.ops.fmha.forward_kernel import attention_forward_kernel
    from fastvlp.ops.fmha.launcher import only_tile

    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, length, 2, 16, generator=generator).to(DEVICE) for length in (20, 33, 33))
    for tile in _tiles():
        with only_tile(attention_forward_kernel, tile):
            attention(q, k, v, backend="triton")
            assert attention_forward_kernel.best_config is tile
            attention(q, k, v, backend="triton")  # the launcher's direct repeat path keeps it
            assert attention_forward_kernel.configs == [tile]
    with pytest.raises(TypeError, match="autotuned_kernel"):
        with only_tile(attention_forward_kernel.fn, _tiles()[0]):
            pass


def test_summary_ratio_of_the_autotuned_tile_to_the_best():
    rows = [
        {"name": "E", "dropout_p": 0.0, "kernel": "forward", "tile": "128x64 w4 s3", "median_ms": 1.0},
        {"name": "E", "dropout_p": 0.0, "kernel": "forward", "tile": "64x64 w4 s3", "median_ms": 0.8},
        # a wrong result or a tile that did not run never counts as the best
        {"name": "E", "dropout_p": 0.0, "kernel": "forward", "tile": "64x32 w4 s2", "median_ms": 0.1,
         "status": "wrong result: max_abs_diff_vs_reference 1 > 0.01"},
        {"name": "E", "dropout_p": 0.0, "kernel": "forward", "tile": "128x128 w8 s2", "median_ms": None},
        {"name": "E", "dropout_p": 0.0, "kernel": "forward", "tile": "autotuned: 128x64 w4 s3", "median_ms": 1.2},
    ]
    lines = attention_tiles.tile_summary(rows).splitlines()
    assert len(lines) == 2
    assert lines[1].split() == ["E", "0.0", "forward", "64x64", "w4", "s3", "0.800", "128x64", "w4", "s3", "1.200",
                                "1.50"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_sweep_without_a_gpu_says_so(capsys):
    with pytest.raises(SystemExit) as exit_info:
        attention_tiles.main([])
    assert exit_info.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--kernels", "softmax"], "--kernels: unknown"),
    (["--scenarios", "Q"], "--scenarios: unknown"),
    (["--dropouts", "1.5"], "--dropouts: expected probabilities"),
])
def test_sweep_rejects_bad_arguments(arguments, message, capsys):
    with pytest.raises(SystemExit):
        attention_tiles.main(arguments)
    assert message in capsys.readouterr().err


def test_summary_names_tiles_whose_timings_had_not_settled():
    rows = [
        {"name": "E", "dropout_p": 0.0, "kernel": "forward", "tile": "128x64 w4 s3", "median_ms": 1.0, "drift": 1.3},
        {"name": "E", "dropout_p": 0.0, "kernel": "forward", "tile": "autotuned: 128x64 w4 s3", "median_ms": 1.1,
         "drift": 1.0},
        {"name": "E", "dropout_p": 0.1, "kernel": "forward", "tile": "128x64 w4 s3", "median_ms": 1.0, "drift": 1.0},
        {"name": "E", "dropout_p": 0.1, "kernel": "forward", "tile": "autotuned: 128x64 w4 s3", "median_ms": 1.0,
         "drift": 1.0},
    ]
    lines = attention_tiles.tile_summary(rows).splitlines()
    assert lines[1].endswith("1.10  unsettled: 128x64 w4 s3 (drift 1.30)")
    assert lines[2].endswith("1.00")
    assert lines[3].startswith("unsettled: the median of the first half")


def test_sweep_cli_lists_the_valid_names(capsys):
    with pytest.raises(SystemExit):
        attention_tiles.main(["--kernels", "softmax"])
    assert "--kernels: unknown ['softmax']; expected names from forward backward-dq backward-dkdv" in \
        capsys.readouterr().err


def test_tile_names_and_pruning_of_the_gpu_candidate_lists():
    """The sweep's names for the GPU tiles are distinct (a register cap is part of the name), and the
    pruning it reports runs on the GPU candidate lists for every switch of the E2E-VLP shapes."""
    import triton

    from fastvlp.ops.fmha import kernel_config

    assert attention_tiles.tile_name(triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3)) == "128x64 w4 s3"
    assert attention_tiles.tile_name(
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3, maxnreg=168)) == "128x64 w4 s3 r168"
    forward = kernel_config._FORWARD_CONFIGS + kernel_config._SHORT_QUERY_FORWARD_CONFIGS
    for kernel, candidates in (("forward", forward), ("backward-dq", kernel_config._BACKWARD_CONFIGS)):
        names = [attention_tiles.tile_name(config) for config in candidates]
        assert len(set(names)) == len(names)
        for head_dim, dtype in ((32, torch.float16), (32, torch.bfloat16), (64, torch.float16), (32, torch.float32)):
            q = torch.empty(2, 1090, 8, head_dim, dtype=dtype)
            mask = torch.zeros(2, 1090, dtype=torch.bool)
            step = q[:, :1]  # one decoding step's query
            for causal in (False, True):
                for dropout_p in (0.0, 0.1):
                    kept = attention_tiles._kept_by_pruning(kernel, candidates, q, q, causal, mask, dropout_p)
                    assert kept and kept <= set(names)
                    short = attention_tiles._kept_by_pruning(kernel, candidates, step, q, causal, mask, dropout_p)
                    assert short and all(int(name.split("x")[0]) <= 32 for name in short)
                    if kernel == "forward":  # the short-query tiles, only for short queries
                        assert all(int(name.split("x")[0]) >= 64 for name in kept)
                        if dtype != torch.float32:
                            assert short == {attention_tiles.tile_name(c)
                                             for c in kernel_config._SHORT_QUERY_FORWARD_CONFIGS}
                    capped = {name for name in kept if " r" in name}
                    expected = set()
                    if head_dim <= 32 and dtype != torch.float32 and not causal:
                        if kernel != "forward":
                            expected = {"64x64 w4 s2 r168"} if dropout_p else set()
                        else:
                            expected = ({"128x64 w8 s3 r128"} if dropout_p
                                        else {"128x64 w4 s3 r168", "128x128 w8 s2 r128"})
                    assert capped == expected, (head_dim, dtype, causal, dropout_p)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU candidate lists compile only there")
def test_sweep_of_the_gpu_candidate_lists_runs_on_the_gpu():
    """The sweep as `gpu.sh` runs it (no tile list given: every GPU candidate, register caps included),
    here on a small shape in half precision: every tile runs, none is wrong, the pruning flags are set."""
    from fastvlp.ops.fmha import kernel_config

    rows = attention_tiles.run(["small"], dropouts=(0.0,), repeats=2, warmup=1, dtype=torch.float16,
                               kernels=("forward",), device="cuda", scenario_list=[_small_scenario()],
                               progress=False)
    names = [attention_tiles.tile_name(config) for config in kernel_config.forward_configs()]  # short-query ones too
    assert [row["tile"] for row in rows[:-1]] == names and rows[-1]["tile"].startswith("autotuned: ")
    for row in rows:
        assert "status" not in row, (row["tile"], row.get("status"))
        assert row["median_ms"] > 0
    assert all(isinstance(row["kept_by_pruning"], bool) for row in rows[:-1])
