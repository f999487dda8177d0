"""Start-up hook (run from lm_eval_parathinker.pth): makes plain `lm_eval` see our model and tasks."""
