"""The lm-eval side of the package: ``lm_eval --model parathinker``.

* :mod:`.model`: :class:`~.model.ParaThinkerLM`, the lm-eval model (loads, answers
  ``generate_until``, reports);
* :mod:`.options`: its model args, defined and checked once (:class:`~.options.RunOptions`);
* :mod:`.requests`: lm-eval's requests grouped into engine calls, journaled and reused;
* :mod:`.generator`: one group's prompts through the engine, and the responses it makes of them;
* :mod:`.journal`, :mod:`.samples`, :mod:`.progress`: the response journal (resume), a sample's key
  and seed, the live progress bar.

The harness imports the engine; the engine never imports the harness. Nothing here is imported
at start-up: lm-eval imports :mod:`.model` when ``--model parathinker`` is asked for.
"""
