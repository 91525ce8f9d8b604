"""The Triton model repository generated from the stage engines (`python` backend)."""
