"""One request's row inside a batch's `generate` call in `els serve`: its state (`Row`), its sampling
(`RowSampler`) and its streaming, stopping and answer (`RowTracker`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import LogitsProcessor, StoppingCriteria

from els.core.models import LoadedModel
from els.serve.jobs import Delta, Done, Failed, Job, shutting_down
from els.steering.steering import Steering


@dataclass
class Row:
    """A job's state inside one generate call."""

    job: Job
    index: int
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    generated: int = 0
    done: bool = False
    resumed: bool = False  # a retry of a streamed row: its text must begin with what was already sent


class RowSampler(LogitsProcessor):
    """Samples each sampled row with its own temperature, top-p and generator, then leaves only that token,
    so the batch's greedy argmax picks it. A seed thus gives the same answer whatever shares the batch."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in self.rows:
            job = row.job
            if row.done or job.temperature == 0:
                continue
            probs = torch.softmax(scores[row.index].float() / job.temperature, dim=-1)
            if job.top_p < 1:
                p, idx = probs.sort(descending=True)
                keep = p.cumsum(0) - p < job.top_p
                probs = torch.zeros_like(probs).scatter(0, idx[keep], p[keep])
            token = torch.multinomial(probs, 1, generator=row.generator)
            scores[row.index] = float("-inf")
            scores[row.index, token] = 0.0
        return scores


class RowTracker(StoppingCriteria):
    """Called once per generated token: streams each row's new text, applies its stop strings and token
    cap, and finishes it with its diagnostics while the batch goes on."""

    def __init__(
        self,
        rows: list[Row],
        lm: LoadedModel,
        eos: set[int],
        stopping: Callable[[], bool],
        steering: Steering | None,
    ):
        self.rows, self.lm, self.eos, self.stopping, self.steering = rows, lm, eos, stopping, steering

    @functools.cached_property
    def sides(self) -> list:
        """Per row, the harm gate's routing of this batch's prefill (read once, after it)."""
        return self.steering.sides() if self.steering is not None else []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for row in self.rows:
            if not row.done:
                self._step(row, last[row.index])
        return cast(torch.BoolTensor, torch.tensor([row.done for row in self.rows], device=input_ids.device))

    def _step(self, row: Row, token: int) -> None:
        job = row.job
        if job.cancelled:
            row.done = True
            return
        if self.stopping():  # SIGTERM: end every row at its next token
            row.done = True
            return job.answer(Failed(shutting_down()))
        row.generated += 1
        if token in self.eos:
            return self.finish(row, "stop")
        row.out.append(token)
        text = cast(str, self.lm.tokenizer.decode(row.out, skip_special_tokens=True))
        hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if hits:
            row.text = text[: min(hits)]
            return self.finish(row, "stop")
        row.text = text
        if row.generated >= job.max_tokens:
            return self.finish(row, "length")
        # Hold back what could still become a stop string or an incomplete character.
        safe = len(text) - max((len(s) - 1 for s in job.stop), default=0)
        if (broken := text.find("\ufffd", row.sent)) >= 0:
            safe = min(safe, broken)
        self._send(row, safe)

    def _send(self, row: Row, upto: int) -> None:
        if row.job.stream and upto > row.sent:
            if row.resumed:
                if row.text[: row.sent] != row.job.delivered:
                    raise RuntimeError("its retry did not reproduce the text already streamed")
                row.resumed = False
            row.job.emit(Delta(row.text[row.sent : upto]))
            row.job.delivered += row.text[row.sent : upto]
            row.sent = upto

    def finish(self, row: Row, reason: str) -> None:
        self._send(row, len(row.text))
        row.done = True
        row.job.answer(
            Done(
                text=row.text,
                finish_reason=reason,
                prompt_tokens=len(row.job.ids),
                completion_tokens=row.generated,
                els=self.diagnostics(row),
            )
        )

    def diagnostics(self, row: Row) -> dict:
        """The request's settings, which side the harm gate sent it to and with what p(harmful), and per layer
        the energies and steps."""
        s = row.job.steer
        if s is None or self.steering is None:
            return {"enabled": False, "side": "off", "p_harmful": None, "layers": [], "steps_skipped": 0}
        layers = []
        for layer in self.steering.layers:
            st, i = self.steering.stats[layer], row.index
            assert (
                st.energy_before is not None
                and st.energy_after is not None
                and st.rows_taken is not None
                and st.rows_skipped is not None
            ), "a finished row's batch had its prefill"
            layers.append(
                {
                    "layer": layer,
                    "energy_before": float(st.energy_before[i]),
                    "energy_after": float(st.energy_after[i]),
                    "steps_taken": int(st.rows_taken[i]),
                    "steps_skipped": int(st.rows_skipped[i]),
                }
            )
        side, p = self.sides[row.index]
        return {
            "enabled": True,
            **s.manifest(),
            "side": side,
            "p_harmful": p,
            "layers": layers,
            "steps_skipped": sum(x["steps_skipped"] for x in layers),
        }
