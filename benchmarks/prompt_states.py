"""Prompt-only forward passes (the harm gate's pool): shared template prefix vs one full forward per batch.

    python benchmarks/prompt_states.py --model default --prompts els-borderline --n 256

`els.core.hooks.prompt_states` runs the token prefix every row shares (the chat template's system turn and
user header) once and reuses its keys and values; the reference runs each padded batch whole, as generate's
prefill does. Same prompts, batches and dtype, alternated twice. Prints both wall times, the ratio and the
largest difference in the recorded activations relative to their scale. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from els.core.hooks import StopForward, prompt_states, record_last_token
from els.core.models import LoadedModel, chat_texts, load_model, user_conversations
from els.data.prompts import load_prompts


@torch.inference_mode()
def full_forward(lm: LoadedModel, texts: list[str]) -> torch.Tensor:
    """[B, L, d] block inputs at the last token from one left-padded forward of the whole rows, stopped before
    the last block as `prompt_states` is (the path before the shared prefix)."""
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)

    def stop(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        raise StopForward

    with record_last_token(lm.blocks) as captured:
        handle = lm.blocks[-1].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            lm.model(**enc, position_ids=positions, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
    return torch.stack(captured, dim=1)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", default="els-borderline")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    lm = load_model(args.model)
    prompts = load_prompts(args.prompts).sample(args.n).prompts
    texts = chat_texts(lm.tokenizer, user_conversations(prompts))
    batches = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    times: dict[str, float] = {"shared": 0.0, "full": 0.0}
    outs: dict[str, list[torch.Tensor]] = {}
    for _ in range(2):
        for name, fn in (("shared", prompt_states), ("full", full_forward)):
            t = time.perf_counter()
            outs[name] = [fn(lm, b) for b in batches]
            times[name] += time.perf_counter() - t
    shared, full = torch.cat(outs["shared"]), torch.cat(outs["full"])
    rel = float(((shared - full).abs().amax(-1) / full.abs().amax(-1)).max())
    tokens = sum(len(ids) for ids in lm.tokenizer(texts, add_special_tokens=False)["input_ids"])
    print(f"{len(texts)} prompts, {tokens / len(texts):.1f} tokens each, batch {args.batch_size}, {lm.model.dtype}")
    ratio = times["full"] / times["shared"]
    print(f"shared prefix {times['shared']:.1f} s, full {times['full']:.1f} s, ratio {ratio:.2f}")
    print(f"largest activation difference relative to the row's largest value: {rel:.4f}")
    print(json.dumps({"shared_s": times["shared"], "full_s": times["full"], "max_rel_diff": rel}))


if __name__ == "__main__":
    main()
