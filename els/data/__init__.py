"""Prompt sets: the public benchmarks, ELS's own prompts (`resources/`), any file, and jailbreak framings."""

from els.data.prompts import KNOWN_SETS, load_benchmark, load_prompts, read_file
from els.data.promptset import KINDS, Kind, PromptSet

__all__ = ["KINDS", "KNOWN_SETS", "Kind", "PromptSet", "load_benchmark", "load_prompts", "read_file"]
