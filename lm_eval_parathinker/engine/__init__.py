"""The ParaThinker decoding engine (see :mod:`.generate` for the layers)."""

from .generate import MODES, POSITIONS, SCHEDULING, SUMMARY_KV, TERMINATIONS, GenerationOutput, ParaThinkerEngine
from .sampling import SamplingParams

__all__ = ["MODES", "POSITIONS", "SCHEDULING", "SUMMARY_KV", "TERMINATIONS", "GenerationOutput", "ParaThinkerEngine",
           "SamplingParams"]
