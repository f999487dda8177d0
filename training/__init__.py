"""ParaThinker SFT: multi-path data (:mod:`training.data`, :mod:`training.make_data`), training
sequences from the shared protocol (:mod:`training.sequence`) and the trainer (:mod:`training.sft`)."""
