"""Running a model across the ranks: building it from a plan and a checkpoint, generating in lockstep,
sampling, the tokenizer, and the start-up every command shares."""
