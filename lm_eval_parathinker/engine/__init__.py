"""The ParaThinker decoding engine (see :mod:`.generate` for the layers)."""

from .generate import MODES, SCHEDULING, GenerationOutput, ParaThinkerEngine
from .options import POSITIONS, SUMMARY_KV, TERMINATIONS, EngineOptions
from .sampling import SamplingParams

__all__ = ["MODES", "POSITIONS", "SCHEDULING", "SUMMARY_KV", "TERMINATIONS", "EngineOptions", "GenerationOutput",
           "ParaThinkerEngine", "SamplingParams"]
