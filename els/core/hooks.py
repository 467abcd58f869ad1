"""Forward pre-hooks on decoder blocks: every way ELS reads or edits the residual stream goes through these."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


def cache_arg(model: nn.Module) -> str:
    """The forward's name for the KV cache: transformers 5 renamed `past_key_values` to `cache` (the old name
    goes in 5.40); 4.x knows only the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class PrefixedBatch:
    """Token rows laid out as [shared prefix | left padding | own tokens], the prefix's keys and values computed
    once for the whole batch (`cache`, None without a shared prefix). Position ids count real tokens, as
    generate's do under left padding, so a row reads the same as it would alone."""

    shared: list[int]
    own: torch.Tensor  # [B, W] the rows' own tokens, left-padded
    mask: torch.Tensor  # [B, P + W]
    cache: DynamicCache | None

    @property
    def input_ids(self) -> torch.Tensor:
        """[B, P + W] the whole rows, as generate takes them beside `cache`."""
        prefix = torch.tensor([self.shared] * len(self.own), dtype=self.own.dtype, device=self.own.device)
        return torch.cat([prefix, self.own], dim=1)

    def positions(self) -> torch.Tensor:
        """[B, W] position ids of the own tokens."""
        return (self.mask.cumsum(-1) - 1).clamp_min(0)[:, len(self.shared) :]


def prefixed_batch(lm: LoadedModel, texts: list[str], run: Callable[..., object]) -> PrefixedBatch:
    """Tokenise `texts` and run their shared prefix once through `run(**model_inputs)` (a forward of
    `lm.model`, possibly stopped early: the cache then holds the blocks below the stop)."""
    ids = lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
    shared = _shared_prefix(ids)
    device = lm.model.device
    cache = None
    if shared:
        cache = DynamicCache()
        run(input_ids=torch.tensor([shared], device=device), use_cache=True, **{cache_arg(lm.model): cache})
        cache.batch_repeat_interleave(len(texts))
    rest = [row[len(shared) :] for row in ids]
    width = max(map(len, rest))
    pad = lm.tokenizer.pad_token_id or 0
    own_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=device)
    own = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=device)
    mask = torch.cat([torch.ones(len(rest), len(shared), dtype=own.dtype, device=device), own], dim=1)
    return PrefixedBatch(shared, own_ids, mask, cache)


@torch.inference_mode()
def prompt_states(lm: LoadedModel, texts: list[str], layers: int | None = None) -> torch.Tensor:
    """[B, L, d]: each block's input at the last prompt token (the prefill, no generation), with generate's
    position ids under left padding: a row reads the same alone or in a padded batch, and what it will read
    at generation time. The one recorder of prompt activations (gate training, gate calibration, tuning).

    The token prefix every row shares (the chat template's system turn and user header: about half of a short
    prompt) runs once and its keys and values serve the whole batch; the rows run only their own tokens.
    `layers`: record only the first that many blocks, and stop the forward pass there (L = layers)."""
    upto = len(lm.blocks) if layers is None else layers
    if not 1 <= upto <= len(lm.blocks):
        raise ValueError(f"layers must be between 1 and {len(lm.blocks)}, got {layers}")
    last = lm.blocks[min(upto, len(lm.blocks) - 1)]

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> NoReturn:
        raise StopForward

    def run(**inputs: object) -> None:
        handle = last.register_forward_pre_hook(stop, with_kwargs=True)  # after any recorder's hook
        try:
            lm.model(**inputs)
        except StopForward:
            pass  # skips the blocks above and the vocabulary projection, which nothing here reads
        finally:
            handle.remove()

    batch = prefixed_batch(lm, texts, run)
    with record_last_token(lm.blocks[:upto]) as captured:
        run(
            input_ids=batch.own,
            attention_mask=batch.mask,
            position_ids=batch.positions(),
            **{cache_arg(lm.model): batch.cache},
            use_cache=batch.cache is not None,
        )
    return torch.stack(captured, dim=1)  # type: ignore[arg-type]


def _shared_prefix(rows: list[list[int]]) -> list[int]:
    """The longest token prefix of every row that still leaves each row at least its last token."""
    n = min(len(r) for r in rows) - 1
    for i in range(max(n, 0)):
        if any(r[i] != rows[0][i] for r in rows):
            return rows[0][:i]
    return rows[0][: max(n, 0)]
