"""Tiny randomly initialised models of several families, synthetic collections and artefacts, built offline in
seconds."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from els.core.models import LoadedModel, config_fingerprint, prepare_tokenizer
from els.steering.settings import SteerSettings
from els.training.collect import Collection, Record, state_of
from els.training.energy import TrainConfig, train_energy
from els.training.recipe import make_artefact, safety_config

WORDS = (
    "how do i kill a python process bake cake the make bomb what is chess beat my wife at you can help user "
    "assistant : ? . , ! sorry i'm cannot sure here are steps first then"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    prepare_tokenizer(fast)
    return fast


def tiny_config(family: str, vocab: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
    )
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "gemma":
        return GemmaConfig(**common, head_dim=8)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=128,
            eos_token_id=1,
            bos_token_id=1,
            pad_token_id=0,
        )
    raise ValueError(family)


FAMILIES = ("qwen2", "llama", "gemma", "gpt2")


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)), dtype=torch.float32)
    model.eval().requires_grad_(False)
    model.generation_config.pad_token_id = 0
    return LoadedModel(model, tok, f"tiny-{family}")


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
    meta = {
        "model": lm.name,
        "model_fingerprint": config_fingerprint(lm.model),
        "sets": {},
        "judge": "prefix",
        "max_new_tokens": 8,
        "system": None,
    }
    return Collection(records, torch.stack(acts), meta)


def save_collection(col: Collection, path: Path) -> Path:
    """`col` written as `els collect` writes a collection folder."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({"activations": col.activations.contiguous()}, path / "states.safetensors")
    (path / "states.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in col.records))
    (path / "collect.json").write_text(json.dumps(col.meta))
    return path


def tiny_artefact(lm: LoadedModel, *, top_n: int = 2, layer_rule: str = "top_auc", **steer):
    """An artefact of energies fitted to `synthetic_collection` (four-state contrast, and a safety energy),
    steering with eta 0.5, K 3 at every position, no gates and flagged rows left alone unless `steer`
    (SteerSettings fields) says otherwise."""
    col = synthetic_collection(lm)
    cfg = TrainConfig(widths=(16, 8), epochs=5, lr=1e-3, batch_size=16, contrast="four-state")
    result = train_energy(col.activations, col.states, cfg)
    safety = train_energy(col.activations, col.states, safety_config(cfg))
    settings = SteerSettings().override(
        **(
            {"eta": 0.5, "steps": 3, "energy_gate": None, "harm_gate": None, "flagged": "leave", "positions": "last"}
            | steer
        )
    )
    return make_artefact(result, col, cfg, settings, layer_rule=layer_rule, top_n=top_n, safety=safety)


def one_line_error(result, names: str) -> str:
    """Assert that a CliRunner `result` is exit code 2 and one `error: ` line naming `names`, no traceback."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, RuntimeError))
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], result.output
    return lines[0]


def saved_tiny_model(root):
    """The tiny Qwen2 model saved as a model directory under `root/model`, as a user would pass it."""
    lm = tiny_model("qwen2")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    return lm
