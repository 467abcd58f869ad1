"""Forward pre-hooks on decoder blocks: every way ELS reads or edits the residual stream goes through these."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import torch
from torch import nn
from transformers import DynamicCache

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
    at generation time. The one recorder of prompt activations (gate training, gate calibration, tuning).

    The token prefix every row shares (the chat template's system turn and user header: about half of a short
    prompt) runs once and its keys and values serve the whole batch; the rows run only their own tokens."""
    ids = lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    shared = _shared_prefix(ids)
    device = lm.model.device
    blocks = lm.blocks

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> NoReturn:
        raise StopForward

    def run(**inputs: object) -> None:
        handle = blocks[-1].register_forward_pre_hook(stop, with_kwargs=True)  # after any recorder's hook
        try:
            lm.model(**inputs)
        except StopForward:
            pass  # skips the last block and the vocabulary projection, which nothing here reads
        finally:
            handle.remove()

    # transformers 5 renamed `past_key_values` to `cache` (the old name goes in 5.40); 4.x knows only the old one
    cache_arg = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
    past = None
    if shared:
        past = DynamicCache()
        run(input_ids=torch.tensor([shared], device=device), use_cache=True, **{cache_arg: past})
        past.batch_repeat_interleave(len(texts))
    rest = [row[len(shared) :] for row in ids]
    width = max(map(len, rest))
    pad = lm.tokenizer.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=device)
    own = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=device)
    mask = torch.cat([torch.ones(len(rest), len(shared), dtype=own.dtype, device=device), own], dim=1)
    # generate's position ids under left padding (count of real tokens before each one), so the gate reads
    # what it will read at generation time
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, len(shared) :]
    with record_last_token(blocks) as captured:
        run(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            **{cache_arg: past},
            use_cache=past is not None,
        )
    return torch.stack(captured, dim=1)  # type: ignore[arg-type]


def _shared_prefix(rows: list[list[int]]) -> list[int]:
    """The longest token prefix of every row that still leaves each row at least its last token."""
    n = min(len(r) for r in rows) - 1
    for i in range(max(n, 0)):
        if any(r[i] != rows[0][i] for r in rows):
            return rows[0][:i]
    return rows[0][: max(n, 0)]
