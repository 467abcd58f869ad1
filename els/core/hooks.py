"""Forward pre-hooks on decoder blocks: every way ELS reads or edits the residual stream goes through these."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import torch
from torch import nn

from els.core.models import LoadedModel, block_input

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

PreHook = Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]


def add_pre_hooks(hooks: Iterable[tuple[nn.Module, PreHook]]) -> list[RemovableHandle]:
    """Register forward pre-hooks that see keyword arguments too (transformers passes the residual either way)."""
    return [module.register_forward_pre_hook(fn, with_kwargs=True) for module, fn in hooks]


@contextmanager
def pre_hooks(hooks: Iterable[tuple[nn.Module, PreHook]]) -> Iterator[None]:
    """`add_pre_hooks` for the duration of a `with` block; removed on exit, also after an error."""
    handles = add_pre_hooks(hooks)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_last_token(blocks: nn.ModuleList) -> Iterator[list[torch.Tensor | None]]:
    """Record each block's input at position -1 on its first call (the prefill), in float32 on the CPU."""
    captured: list[torch.Tensor | None] = [None] * len(blocks)

    def make_hook(i: int) -> PreHook:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if captured[i] is None:
                captured[i] = block_input(args, kwargs)[:, -1].float().cpu()

        return hook

    with pre_hooks((b, make_hook(i)) for i, b in enumerate(blocks)):
        yield captured


class StopForward(Exception):
    """Raised from a block's pre-hook to end a forward pass there: nothing above that block is needed (the
    gate's pre-pass in els.steering.gate, `prompt_states` here)."""


@torch.inference_mode()
def prompt_states(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    """[B, L, d]: each block's input at the last prompt token (the prefill, no generation), with generate's
    position ids under left padding: a row reads the same alone or in a padded batch, and what it will read
    at generation time. The one recorder of prompt activations (gate training, gate calibration, tuning)."""
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.model.device)
    blocks = lm.blocks

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> NoReturn:
        raise StopForward

    # generate's position ids under left padding, so the gate reads what it will read at generation time
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with record_last_token(blocks) as captured:
        handle = blocks[-1].register_forward_pre_hook(stop, with_kwargs=True)  # after the recorder's hook
        try:
            lm.model(**enc, position_ids=positions, use_cache=False)
        except StopForward:
            pass  # skips the last block and the vocabulary projection, which the gate never reads
        finally:
            handle.remove()
    return torch.stack(captured, dim=1)  # type: ignore[arg-type]
