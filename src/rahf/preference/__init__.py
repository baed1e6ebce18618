"""Step 1: teach the model what is preferred (SCIT: one model; Dual: two adapters)."""
