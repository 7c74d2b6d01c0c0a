"""Output-level fusion: one model whose output is the weighted sum of the models' outputs."""
