"""The lm-eval internals the package relies on, in one place (see :mod:`.lm_eval`)."""
