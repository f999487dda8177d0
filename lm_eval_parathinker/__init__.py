"""ParaThinker native parallel thinking for the lm-evaluation-harness."""

__version__ = "0.1.0"
