"""The engines behind one interface (``base.EngineClient``), apart from the HTTP layer."""

from .base import (LOGPROB_FLOOR, Delta, DoesNotFit, EngineClient, GrammarError, Logprob, QueueFull,
                   Request, SamplingParams, ServedModel, StatLogger, StepStats)

__all__ = ["LOGPROB_FLOOR", "Delta", "DoesNotFit", "EngineClient", "GrammarError", "Logprob",
           "QueueFull", "Request", "SamplingParams", "ServedModel", "StatLogger", "StepStats"]
