"""Training the demo model (issue 7): synthetic talking-character data and, to come, the VAE,
the bidirectional teacher and the four distillation stages. Never imported by the services."""
