import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen
# before triton is first imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Small model tests run faster on one intra-op thread: several OpenMP threads on a shared
    2-core machine oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def drivers_on_one_thread(one_thread):
    """The pre-training and fine-tuning drivers keep the one intra-op thread set here: they would otherwise
    take every core, and on a shared 2-core machine two OpenMP threads make a small model's step many
    times slower."""
    with pytest.MonkeyPatch.context() as patch:
        for module in ("fastvlp.train.finetune", "fastvlp.train.pretrain"):
            patch.setattr(f"{module}.configure_threads", lambda context: torch.get_num_threads())
        yield
