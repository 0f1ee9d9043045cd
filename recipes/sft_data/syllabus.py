"""The syllabus (level → grade → subject → topics) and the task list that drive question generation."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from qforge.engine.config_io import ConfigKeyError, build, read_yaml


@dataclass(frozen=True)
class Topic:
    level: str
    grade: str
    subject: str
    topic: str

    @property
    def key(self) -> str:
        """A short stable id: the same topic keeps its id when the syllabus is reordered or extended."""
        text = "\x1f".join((self.level, self.grade, self.subject, self.topic))
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


@dataclass
class Task:
    name: str
    instructions: str
    count: int = 5  # questions per topic
    subjects: list[str] | None = None  # only topics of these subjects (default: every subject)
    # numeric: the question generator gives the final number; choice: a known option letter (seed MCQs);
    # constraints: the generator gives verifiable constraints (recipes/evals/instruction_following.py); tool_call:
    # the generator gives tools and the reference call (recipes/evals/function_calling.py)
    answer_check: Literal["none", "numeric", "choice", "constraints", "tool_call"] = "none"
    samples: int = 1  # responses per question (rejection sampling draws several)
    keep: int = 1  # responses kept per question

    def __post_init__(self):
        if not self.name.replace("_", "").isalnum():
            raise ValueError(f"task name {self.name!r} must be letters, digits and underscores")
        if self.count < 1 or self.samples < 1 or not 1 <= self.keep <= self.samples:
            raise ValueError(f"task {self.name!r}: need count >= 1 and 1 <= keep <= samples "
                             f"(got count={self.count}, samples={self.samples}, keep={self.keep})")


@dataclass
class TaskList:
    tasks: list[Task]


def read_syllabus(path: str) -> list[Topic]:
    """A YAML mapping level → grade → subject → list of topic strings."""
    raw = read_yaml(path)
    topics = []
    for level, grades in raw.items():
        for grade, subjects in _mapping(grades, path, f"{level}").items():
            for subject, names in _mapping(subjects, path, f"{level} → {grade}").items():
                where = f"{level} → {grade} → {subject}"
                if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
                    raise ConfigKeyError(f"{path}: {where} must be a non-empty list of topic strings")
                topics += [Topic(str(level), str(grade), str(subject), name.strip()) for name in names]
    if not topics:
        raise ConfigKeyError(f"{path}: the syllabus has no topics")
    return topics


def _mapping(value, path: str, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise ConfigKeyError(f"{path}: {where} must be a non-empty mapping (level → grade → subject → topics)")
    return value


def read_tasks(path: str) -> list[Task]:
    tasks = build(TaskList, read_yaml(path), path).tasks
    names = [task.name for task in tasks]
    if not tasks or len(set(names)) != len(names):
        raise ConfigKeyError(f"{path}: 'tasks' needs at least one task and distinct names, got {names}")
    return tasks


def jobs(tasks: list[Task], topics: list[Topic], topics_per_task: int | None = None) -> list[tuple[Task, Topic]]:
    """Every (task, topic) pair the task applies to (its first `topics_per_task` topics, if given); a task
    whose subjects match no topic is an error."""
    pairs = []
    for task in tasks:
        mine = [t for t in topics if task.subjects is None or t.subject in task.subjects][:topics_per_task]
        if not mine:
            raise ConfigKeyError(f"task {task.name!r}: no syllabus topic has a subject in {task.subjects}")
        pairs += [(task, topic) for topic in mine]
    return pairs
