"""Write els/data/resources/pool_removed.txt: the default gate pool's near-duplicates of the default evaluation
and tuning sets. Run it (with every one of those sets readable: ../shared/data or ELS_DATA) after changing the
pool, the evaluation sets or the dedupe rule; tests/test_gate_training.py checks the shipped list is current."""

from pathlib import Path

from els.core.models import cache_dir
from els.training.pool import (
    DEFAULT_EVAL,
    DEFAULT_EXCLUDE,
    DEFAULT_POOL,
    REMOVED_FILE,
    cached_encoder,
    current_removed,
    load_spec,
)

keys = current_removed(
    [load_spec(s) for s in DEFAULT_POOL],
    [load_spec(s) for s in DEFAULT_EVAL + DEFAULT_EXCLUDE],
    cached_encoder(cache_dir() / "gate"),
)
path = Path(__file__).resolve().parents[1] / "els" / "data" / "resources" / REMOVED_FILE
header = f"# {len(keys)} pool prompts (els.training.pool.text_key) removed as near-duplicates of evaluation sets\n"
path.write_text(header + "".join(f"{k}\n" for k in keys))
print(f"{path}: {len(keys)} keys")
