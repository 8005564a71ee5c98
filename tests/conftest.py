import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen
# before triton is first imported by any test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SEED_VARIABLE = "FASTVLP_TEST_SEED"


@pytest.fixture
def fresh_seed(request):
    """A new seed on every run, so random inputs differ from run to run; a failing test's report names it,
    and FASTVLP_TEST_SEED=<seed> replays that run."""
    seed = int(os.environ[SEED_VARIABLE]) if os.environ.get(SEED_VARIABLE) else int(torch.seed() % 2**31)
    request.node.user_properties.append(("fresh_seed", seed))
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [value for key, value in item.user_properties if key == "fresh_seed"]
    if report.failed and seeds:
        report.sections.append(("random inputs", f"seed {seeds[0]}: replay with {SEED_VARIABLE}={seeds[0]}"))


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
