"""The ParaThinker decoding engine (see :mod:`.generate` for the layers)."""

from .generate import GenerationOutput, ParaThinkerEngine
from .options import MODES, POSITIONS, SUMMARY_KV, TERMINATIONS, CallSettings, EngineOptions
from .sampling import SamplingParams
from .scheduler import Scheduler, StaticScheduler

__all__ = ["MODES", "POSITIONS", "SUMMARY_KV", "TERMINATIONS", "CallSettings", "EngineOptions", "GenerationOutput",
           "ParaThinkerEngine", "SamplingParams", "Scheduler", "StaticScheduler"]
