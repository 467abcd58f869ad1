"""A request as the generation worker of `els serve` takes it (`Job`), and the events it sends back: text
generated so far (`Delta`, streamed jobs), the answer (`Done`) or an error (`Failed`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from els.serve.protocol import ApiError
from els.steering.settings import SteerSettings


@dataclass(frozen=True)
class Delta:
    """Text a streamed job generated since its last event."""

    text: str


@dataclass(frozen=True)
class Done:
    """A job's answer: its whole text, why it ended, its token counts and the steering it got."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    els: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Delta | Done | Failed


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    steer: SteerSettings | None
    stream: bool
    emit: Callable[[Event], None]  # thread-safe: hands an event to the request's coroutine
    cancelled: bool = False
    answered: bool = False  # its `Done` or `Failed` is out
    delivered: str = ""  # the text streamed so far, which a retry must reproduce

    def answer(self, event: Done | Failed) -> None:
        """The job's last event; any later one is dropped."""
        if not self.answered:
            self.answered = True
            self.emit(event)


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
