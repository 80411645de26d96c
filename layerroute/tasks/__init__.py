"""Tasks: datasets, splits, answer extraction and prompts (scoring lives in ``layerroute.scoring``).

``get_task(spec, **options)`` returns a ``Task``; ``Task.split(which, seed)`` its search /
validation / test subset. See ``list_tasks(usage=True)`` for the specs.
"""

from .base import (KINDS, LETTERS, SPLITS, Example, Task, TaskError, answer_letter, format_choices, letter_index,
                   split_of, stable_rng)
from .extract import EXTRACTORS, extract_answer, get_extractor, normalize_number
from .generated import SUBTASKS as GENERATED_SUBTASKS
from .loaders import load_csv, load_jsonl, load_parquet, mmlu_subjects, rows_to_task
from .prompts import render_prompt
from .registry import get_task, list_tasks, register_task
from .suite import SUBTASKS

__all__ = [
    "EXTRACTORS", "GENERATED_SUBTASKS", "KINDS", "LETTERS", "SPLITS", "SUBTASKS", "Example", "Task", "TaskError",
    "answer_letter", "extract_answer", "format_choices", "get_extractor", "get_task", "letter_index", "list_tasks",
    "load_csv", "load_jsonl", "load_parquet", "mmlu_subjects", "normalize_number", "register_task", "render_prompt",
    "rows_to_task", "split_of", "stable_rng",
]
