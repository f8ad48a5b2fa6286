"""The `pipeline` commands, one module per stage: stage_one (adapt, cache, verify, inspect),
stage_two (train, evaluate, ablate), downstream (finetune, fetch-task)."""
