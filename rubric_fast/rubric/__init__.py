"""Rubric schema, loaders (HealthBench, RaR, verl parquet, OpenRubrics, rubric_fast jsonl) and aggregation."""

from .schema import (
    AGGREGATION_METHODS,
    CATEGORIES,
    KINDS,
    POLARITIES,
    VERIFIERS,
    Aggregation,
    Criterion,
    Rubric,
    RubricError,
    Tier,
    normalize_prompt,
)
from .loaders import (
    FORMATS,
    criterion_from_dict,
    detect_format,
    load_healthbench,
    load_openrubrics,
    load_rar,
    load_rubric_fast,
    load_rubrics,
    load_verl_parquet,
    parse_openrubrics_text,
    rubric_from_dict,
)
from .aggregate import AggregateResult, aggregate

__all__ = [
    "AGGREGATION_METHODS", "CATEGORIES", "KINDS", "POLARITIES", "VERIFIERS", "Aggregation", "Criterion",
    "Rubric", "RubricError", "Tier", "normalize_prompt", "FORMATS", "criterion_from_dict", "detect_format",
    "load_healthbench", "load_openrubrics", "load_rar", "load_rubric_fast", "load_rubrics",
    "load_verl_parquet", "parse_openrubrics_text", "rubric_from_dict", "AggregateResult", "aggregate",
]
