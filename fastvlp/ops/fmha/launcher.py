"""How the launchers start an autotuned attention kernel: with the fixed tile of deterministic mode, or
through ``triton.autotune`` on the first launch of a key and straight to the tile it chose afterwards,
since ``Autotuner.run`` rebuilds its key from every argument on each call (about 25 us of host time per
launch on a CPU, for kernels launched two or three times per attention call)."""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from triton.runtime.autotuner import Autotuner

from .kernel_config import deterministic_config


def _config_kwargs(config) -> dict:
    """A config's launch keyword arguments (``Config.all_kwargs`` where Triton has it)."""
    if hasattr(config, "all_kwargs"):
        return config.all_kwargs()
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


class _TunedLaunches:
    """The configs one autotuned kernel chose, by launch key. Valid while the autotuner keeps its
    ``configs`` and ``cache`` objects; replacing either (as a test restricting the tiles does) starts
    afresh."""

    def __init__(self, kernel):
        self.configs, self.cache = kernel.configs, kernel.cache
        names = list(kernel.arg_names)
        self.key_positions = [(names.index(name) if name in names else None, name) for name in kernel.keys]
        self.chosen = {}

    def current(self, kernel) -> bool:
        return self.cache is kernel.cache and self.configs is kernel.configs

    def key(self, args, kwargs) -> tuple:
        """The autotuner's key arguments and the dtypes of the leading tensor arguments, which together
        fix the autotuner's own key because the launchers pass every tensor (never None) before any
        other argument, and no tensor by keyword."""
        key = [args[index] if index is not None and index < len(args) else kwargs[name]
               for index, name in self.key_positions]
        for argument in args:
            if not isinstance(argument, torch.Tensor):
                break
            key.append(argument.dtype)
        return tuple(key)


_TUNED_LAUNCHES = {}
# First launches are serialised: the autotuner keeps the config of its latest launch in one attribute
# (``best_config``), so two threads tuning different keys at once could each read the other's.
_FIRST_LAUNCH_LOCK = threading.RLock()


def _launch_autotuned(kernel, grid, args, kwargs) -> None:
    state = _TUNED_LAUNCHES.get(kernel)
    if state is not None and state.current(kernel):
        chosen = state.chosen.get(state.key(args, kwargs))
        if chosen is not None:
            kernel.fn[grid](*args, **kwargs, **chosen)
            return
    with _FIRST_LAUNCH_LOCK:  # first launch of this key: the autotuner tunes it (or finds it tuned)
        state = _TUNED_LAUNCHES.get(kernel)
        if state is None or not state.current(kernel):
            try:
                state = _TUNED_LAUNCHES[kernel] = _TunedLaunches(kernel)
            except AttributeError:  # a Triton whose autotuner lacks these attributes: launch it as it is
                kernel[grid](*args, **kwargs)
                return
        kernel[grid](*args, **kwargs)
        config = kernel.best_config
        if config.pre_hook is None:  # a config with a hook keeps going through the autotuner, which runs it
            state.chosen[state.key(args, kwargs)] = _config_kwargs(config)


@contextlib.contextmanager
def only_tile(autotuned_kernel, config) -> Iterator[None]:
    """Within the block, autotuning of ``autotuned_kernel`` can pick only ``config`` (a ``triton.Config``),
    and nothing it tuned before is reused: how a tile sweep runs one candidate at a time. Not for use
    while other threads launch the kernel. Deterministic mode keeps its own fixed tile."""
    if type(autotuned_kernel) is not Autotuner:
        raise TypeError(f"autotuned_kernel: expected a triton.autotune kernel, got {type(autotuned_kernel).__name__}")
    saved = autotuned_kernel.configs, autotuned_kernel.cache
    autotuned_kernel.configs, autotuned_kernel.cache = [config], {}
    try:
        yield
    finally:
        autotuned_kernel.configs, autotuned_kernel.cache = saved


def kernel_launcher(autotuned_kernel, kernel: str, dtype, head_dim_block: int):
    """``launch(grid, *args, **kwargs)`` for one of the autotuned attention kernels.

    - Under ``torch.use_deterministic_algorithms(True)``: the plain kernel with the fixed tile of
      :func:`deterministic_config`, so results are bitwise equal across processes (same GPU model
      and software versions) whatever tiles autotuning would pick.
    - Otherwise: through the autotuner on the first launch of each key, then straight to the config
      it chose (the same launch, without the autotuner's per-call key building).
    - Anything that is not a ``triton.autotune`` kernel (a wrapper, say) is launched as it is.
    """
    if torch.are_deterministic_algorithms_enabled():
        config = deterministic_config(kernel, dtype, head_dim_block)
        tiles = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

        def launch_fixed(grid, *args, **kwargs):
            autotuned_kernel.fn[grid](*args, **kwargs, **tiles)

        return launch_fixed
    if type(autotuned_kernel) is Autotuner:
        return lambda grid, *args, **kwargs: _launch_autotuned(autotuned_kernel, grid, args, kwargs)
    return lambda grid, *args, **kwargs: autotuned_kernel[grid](*args, **kwargs)
