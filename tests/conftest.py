"""Tiny randomly initialised models of several families, built offline in seconds."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

from els.collect import Collection, Record, state_of
from els.energy import TrainConfig, train_energy
from els.models import LoadedModel, prepare_tokenizer
from els.steering import make_artefact

WORDS = ("how do i kill a python process bake cake the make bomb what is chess beat my wife at you can help "
         "user assistant : ? . , ! sorry i'm cannot sure here are steps first then").split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    prepare_tokenizer(fast)
    return fast


def tiny_config(family: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  eos_token_id=1, pad_token_id=0, bos_token_id=1)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "gemma":
        return GemmaConfig(**common, head_dim=8)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128, eos_token_id=1,
                          bos_token_id=1, pad_token_id=0)
    raise ValueError(family)


FAMILIES = ("qwen2", "llama", "gemma", "gpt2")


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)), dtype=torch.float32)
    model.eval().requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return LoadedModel(model, tok, f"tiny-{family}")


@pytest.fixture(params=FAMILIES)
def tiny(request) -> LoadedModel:
    return tiny_model(request.param)


def synthetic_collection(lm: LoadedModel, n: int = 64, seed: int = 0) -> Collection:
    """States whose activations differ by a known direction, so an energy model can learn them."""
    g = torch.Generator().manual_seed(seed)
    layers = lm.model.config.num_hidden_layers
    dim = lm.model.config.hidden_size
    direction = torch.randn(dim, generator=g)
    records, acts = [], []
    for i in range(n):
        kind = "benign" if i % 2 == 0 else "harmful"
        refused = (i // 2) % 2 == 0
        state = state_of(kind, refused)
        good = state in ("helpful", "safe_refusal")
        acts.append(torch.randn(layers, dim, generator=g) + (-1.0 if good else 1.0) * direction)
        records.append(Record(f"prompt {i}", kind, "synthetic", "answer", refused, state))
    meta = {"model": lm.name, "model_fingerprint": _fp(lm), "sets": {}, "judge": "prefix", "max_new_tokens": 8,
            "system": None}
    return Collection(records, torch.stack(acts), meta)


def _fp(lm: LoadedModel) -> str:
    from els.models import config_fingerprint

    return config_fingerprint(lm.model)


def tiny_artefact(lm: LoadedModel, **steer):
    col = synthetic_collection(lm)
    cfg = TrainConfig(widths=(16, 8), epochs=5, lr=1e-3, batch_size=16)
    result = train_energy(col.activations, col.states, cfg)
    layers = lm.model.config.num_hidden_layers
    settings = {"top_n": 2, "eta": 0.5, "steps": 3, "gate": None} | steer
    return make_artefact(result, col, trained_layers=list(range(layers)), train_cfg=cfg, num_layers=layers,
                         **settings)
