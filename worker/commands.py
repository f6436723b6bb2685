"""What the worker's asyncio side asks of its engine thread: one typed command each,
put on `EngineLoop.commands` (a thread-safe queue) and handled in order by the thread."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.schemas import SubmitRequest


@dataclass(frozen=True)
class Submit:
    """A new assignment: tokenize off the thread (`worker.admission`), then `Admit`."""

    req: SubmitRequest
    reply: str


@dataclass(frozen=True)
class Admit:
    """The prompt is ready (`prepared` is an `admission.Prepared`) or refused (a C2CError)."""

    req: SubmitRequest
    reply: str
    prepared: Any


@dataclass(frozen=True)
class Abort:
    request_id: str
    epoch: int = 0  # abort this assignment and older ones; 0: whatever runs


@dataclass(frozen=True)
class Control:
    knobs: dict[str, Any]  # `ControlUpdate.knobs()`: engine knob name -> value


@dataclass(frozen=True)
class AddModel:
    model_id: str
    path: str


@dataclass(frozen=True)
class Prewarm:
    model_id: str
    path: str


@dataclass(frozen=True)
class Evict:
    model_id: str


@dataclass(frozen=True)
class Call:
    """Run fn(engine_loop) on the engine thread; done(result, exception) hears how it went
    (on the engine thread). Live migration's steps (`worker.migration`) run so."""

    fn: Callable[[Any], Any]
    done: Callable[[Any, BaseException | None], None]


@dataclass(frozen=True)
class Reconfigure:
    """Serve a model as a pipeline of stages (`worker.pipeline.StageSpec`s), switched online."""

    model_id: str
    specs: tuple
    nats_url: str


@dataclass(frozen=True)
class Wake:
    """Nothing to do: wakes a thread waiting for commands (on stop)."""


Command = Submit | Admit | Abort | Control | AddModel | Prewarm | Evict | Call | Reconfigure | Wake

__all__ = ["Abort", "AddModel", "Admit", "Call", "Command", "Control", "Evict", "Prewarm", "Reconfigure", "Submit",
           "Wake"]
