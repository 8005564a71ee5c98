"""``PretrainOptions.validate`` reads what the options name before the run folder is touched: the Triton
attention backend on the CPU needs Triton's interpreter, and a bad ``--backbone-weights`` or ``--vocab`` file
is refused naming the option (a usage error of ``fastvlp pretrain``, which then writes nothing)."""
import pytest
import torch
from torchvision.models.resnet import BasicBlock, ResNet

from fastvlp.cli import main
from fastvlp.data.tokenizer import SPECIAL_TOKENS
from fastvlp.train import loop
from fastvlp.train.pretrain import PretrainOptions

INTERPRETER_OFF = "the interpreter is off: set TRITON_INTERPRET=1 in the environment before starting"


@pytest.fixture
def paths(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return data, tmp_path / "out"


def options(paths, **changes):
    data, out = paths
    return PretrainOptions(preset="tiny", data=data, out=out, device="cpu", **changes)


def usage_error(argv, capsys):
    """The exit status and stderr of a ``fastvlp`` command that must stop with a usage error."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: ")
    return stop.value.code, err


def pretrain_argv(paths, *extra):
    data, out = paths
    return ["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out), "--device", "cpu", *extra]


def test_triton_attention_on_the_cpu_is_refused_while_the_interpreter_is_off(paths, monkeypatch, capsys):
    monkeypatch.setattr(loop, "triton_interpreter_problem", lambda: INTERPRETER_OFF)
    with pytest.raises(ValueError, match=r"^attention_backend: 'triton' on the CPU expects Triton's interpreter .*"
                                         r"set TRITON_INTERPRET=1 in the environment before starting"):
        options(paths, attention_backend="triton").validate()
    with pytest.raises(ValueError, match=r"^attention_backend: 'triton' on the CPU"):  # the same through --set
        options(paths, config_overrides={"attention_backend": "triton"}).validate()
    status, err = usage_error(pretrain_argv(paths, "--attention-backend", "triton"), capsys)
    assert status == 2 and "argument --attention-backend: 'triton' on the CPU expects Triton's interpreter" in err
    assert "TRITON_INTERPRET=1" in err and not paths[1].exists()
    # the other backends, and the kernels on a GPU, do not need the interpreter
    options(paths, attention_backend="fastvlp").validate()
    loop.check_attention_backend("triton", "cuda")
    with pytest.raises(ValueError, match=r"^--attention-backend: 'triton'"):
        loop.check_attention_backend("triton", torch.device("cpu"), "--attention-backend")


def test_triton_attention_on_the_cpu_is_accepted_while_the_interpreter_is_on(paths, monkeypatch):
    monkeypatch.setattr(loop, "triton_interpreter_problem", lambda: None)
    options(paths, attention_backend="triton").validate()


def test_the_interpreter_problem_says_how_to_turn_it_on(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr("fastvlp.ops.fmha.dispatch.interpreter_enabled", lambda: False)
    assert loop.triton_interpreter_problem() == INTERPRETER_OFF


def resnet10_state_dict():
    return ResNet(BasicBlock, [1, 1, 1, 1]).state_dict()


@pytest.mark.parametrize("name, content, message", [
    ("garbage.pth", b"\x00\x17 not a checkpoint" * 20,
     r"^backbone_weights: expected a torch.save file \(weights only\) holding a state dict, .*garbage.pth is not one \("),
    ("garbage.safetensors", b"\xff" * 300,
     r"^backbone_weights: expected a safetensors file holding a state dict, .*garbage.safetensors is not one "
     r"\(SafetensorError"),
    ("tensor.pth", torch.zeros(3),
     r"^backbone_weights: expected a state dict \(parameter name -> tensor\), .*tensor.pth holds a Tensor"),
    ("resnet18.pth", "resnet18",
     r"^backbone_weights: expected a resnet10 state dict, .*resnet18.pth is not one \(missing \[\], "
     r"unexpected \['layer1.1.bn1.bias'"),
    ("wide.pth", "wide",
     r"^backbone_weights: expected a resnet10 state dict, .*wide.pth is not one \(missing \[\], unexpected \[\], "
     r"other shapes \['conv1.weight'\]\)"),
])
def test_a_bad_backbone_weight_file_is_refused_naming_the_option(paths, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "resnet18":
        import torchvision

        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    elif content == "wide":
        state = resnet10_state_dict()
        state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
        torch.save(state, path)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        options(paths, backbone_weights=path).validate()
    status, err = usage_error(pretrain_argv(paths, "--backbone-weights", str(path)), capsys)
    assert status == 2 and "argument --backbone-weights: expected a" in err and str(path) in err
    assert not paths[1].exists()


def test_resnet10_weights_pass_for_the_tiny_preset(paths, tmp_path):
    path = tmp_path / "resnet10.pth"
    torch.save(resnet10_state_dict(), path)
    options(paths, backbone_weights=path).validate()
    # another backbone through --set is the network the weights must fit
    with pytest.raises(ValueError, match=r"^backbone_weights: expected a resnet18 state dict, .* is not one \(missing"):
        options(paths, backbone_weights=path, config_overrides={"backbone": "resnet18"}).validate()


@pytest.mark.parametrize("content, message", [
    ("a\nb\n[UNK]\n", r"^vocab: expected a vocabulary with the special tokens \['\[PAD\]', '\[UNK\]', '\[CLS\]', "
                      r"'\[SEP\]', '\[MASK\]'\], .*vocab.txt lacks \['\[PAD\]', '\[CLS\]', '\[SEP\]', '\[MASK\]'\]"),
    (b"\xff\xfe\x00\x81 binary", r"^vocab: expected a vocab.txt \(UTF-8, one token a line\), .*vocab.txt is not one"),
])
def test_a_bad_vocab_file_is_refused_naming_the_option(paths, tmp_path, capsys, content, message):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        options(paths, vocab=path).validate()
    status, err = usage_error(pretrain_argv(paths, "--vocab", str(path)), capsys)
    assert status == 2 and "argument --vocab: expected a" in err and not paths[1].exists()
    path.write_text("".join(token + "\n" for token in (*SPECIAL_TOKENS, "a", "b")))
    options(paths, vocab=path).validate()


def test_an_exclusion_file_that_is_not_text_is_refused_naming_the_option(paths, tmp_path, capsys):
    path = tmp_path / "exclude.txt"
    path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match=r"^exclude_images: expected a UTF-8 text file \(one image a line\), "):
        options(paths, exclude_images=path).validate()
    status, err = usage_error(pretrain_argv(paths, "--exclude-images", str(path)), capsys)
    assert status == 2 and "argument --exclude-images: expected a UTF-8 text file" in err and not paths[1].exists()


def test_an_unknown_scale_is_refused_naming_the_option(paths, capsys):
    with pytest.raises(ValueError, match=r"^scale: expected a ScaleConfig or one of \['paper', 'tiny'\], got 'huge'"):
        options(paths, scale="huge").validate()
    status, err = usage_error(pretrain_argv(paths, "--scale", "huge"), capsys)
    assert status == 2 and "argument --scale: invalid choice: 'huge'" in err and not paths[1].exists()


@pytest.mark.parametrize("extra, scale", [((), None), (("--scale", "paper"), "paper"), (("--scale", "tiny"), "tiny")])
def test_the_scale_option_reaches_the_run(paths, monkeypatch, extra, scale):
    import fastvlp.train.pretrain as pretrain

    given = []

    def stop_before_the_run(options):
        given.append(options)
        raise ValueError("stopped before the run")

    monkeypatch.setattr(pretrain, "run_pretraining", stop_before_the_run)
    assert main(pretrain_argv(paths, *extra)) == 1
    assert [options.scale for options in given] == [scale]
