"""The shipped defaults are package data: found through importlib.resources in an installed package."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from rubric_fast.trainer.config import DEFAULT_DATASET, EXAMPLES_DIR


def test_examples_are_package_data():
    data = Path(str(files("rubric_fast.examples")))
    assert (data / "default.yaml").is_file() and (data / "default_rubrics.jsonl").is_file()
    assert EXAMPLES_DIR == data
    assert DEFAULT_DATASET.is_file() and DEFAULT_DATASET.parent == data
    assert any((data / "rubrics").glob("*.jsonl"))
