"""Training the demo model: synthetic talking-character data (renderer, speech corpus, scenarios),
the VAE, the bidirectional teacher, the four distillation stages (`recipe.py` runs them in order,
resumably) and the evaluation harness. Never imported by the services."""
