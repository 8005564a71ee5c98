"""The pretrain benchmark (eager against --cuda-graph): its rows on the CPU (eager only) and its argument checks."""
import pytest

from fastvlp.bench import pretrain_graph


def test_eager_row_on_the_cpu(tmp_path):
    rows = pretrain_graph.run("tiny", num_images=6, steps=3, batch_size=2, device="cpu", modes=("eager",),
                              workdir=tmp_path)
    (row,) = rows
    assert row["contender"] == "eager" and row["steps"] == 3 and len(row["raw_ms"]) == 2  # the first step left out
    assert row["median_ms"] > 0 and row["first_step_ms"] > 0 and row["last_loss"] > 0
    assert set(row["last_losses"]) == {"loss_mlm", "loss_itm", "loss_det", "loss_cap"}
    assert row["cuda_graph_fallbacks"] is None and row["backends"]["matcher"] == "fastvlp"
    assert list(tmp_path.iterdir()) == []  # its data and runs were temporary


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(ValueError, match="modes"):
        pretrain_graph.run(modes=("graph",))
    with pytest.raises(SystemExit):
        pretrain_graph.main(["--device", "cpu", "--modes", "cuda-graph"])
    assert "needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain_graph.main(["--device", "cpu", "--steps", "1"])
    assert "--steps >= 2" in capsys.readouterr().err
