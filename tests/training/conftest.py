"""Fixtures of the training tests: a small speech corpus and the whole recipe run once on `tiny`.

The corpus is the synthetic speech-like signal of `media.samples` (the Piper corpus is tested on
its own in test_data_and_evaluation.py), so the recipe fixture costs seconds, not the corpus synthesis.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from livestage.training.corpus import SpeechCorpus
from livestage.training.recipe import Recipe

from .helpers import synthetic_corpus


@pytest.fixture(scope="session")
def corpus() -> SpeechCorpus:
    return synthetic_corpus()


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory, corpus) -> tuple[Recipe, dict]:
    """The whole recipe on `tiny`, exported to `<workdir>/export` (about 15 s)."""
    workdir: Path = tmp_path_factory.mktemp("recipe")
    corpus.save(workdir / "corpus.npz")
    recipe = Recipe("tiny", workdir, out=workdir / "export", log=lambda line: None)
    summary = recipe.run()
    return recipe, summary
