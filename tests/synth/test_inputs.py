"""The shipped syllabus, task list and configs load; bad inputs fail with the place to fix."""
import pytest
import yaml

from qforge.engine.config_io import ConfigKeyError, load_config
from qforge.recipes.curate import CurateConfig
from qforge.recipes.synth import SynthConfig
from qforge.recipes.sft_data.syllabus import Topic, jobs, read_syllabus, read_tasks


def test_shipped_syllabus_and_tasks():
    topics = read_syllabus("recipes/data/syllabus_vi.yaml")
    tasks = read_tasks("recipes/data/tasks_vi.yaml")
    assert [t.level for t in topics[:1]] == ["Tiểu học"] and {t.level for t in topics} == {"Tiểu học", "THCS", "THPT"}
    assert len(tasks) == 12 and len({t.key for t in topics}) == len(topics)
    pairs = jobs(tasks, topics, topics_per_task=2)  # every task finds topics of its subjects
    assert [sum(task is t for t, _ in pairs) for task in tasks] == [2] * 12
    literary = [topic for task, topic in pairs if task.name == "literary_analysis"]
    assert {topic.subject for topic in literary} == {"Ngữ văn"}


def test_shipped_configs_build():
    synth = load_config(SynthConfig, "recipes/configs/synth.yaml", ["output.dir=runs/x"])
    assert synth.backends[0].endpoint.path and synth.stages.reasoning.backend == "local"
    curate = load_config(CurateConfig, "recipes/configs/curate.yaml", ["output.dir=runs/x", "inputs=[{path: a.jsonl}]"])
    assert curate.sampling.target == 5000


def test_topic_keys_are_stable_and_distinct():
    a = Topic("THCS", "Lớp 8", "Toán", "Tứ giác")
    assert a.key == Topic("THCS", "Lớp 8", "Toán", "Tứ giác").key != Topic("THCS", "Lớp 9", "Toán", "Tứ giác").key


@pytest.mark.parametrize("syllabus, message", [
    ({"THCS": {"Lớp 6": {"Toán": []}}}, "THCS → Lớp 6 → Toán must be a non-empty list of topic strings"),
    ({"THCS": {"Lớp 6": ["Số nguyên"]}}, "THCS → Lớp 6 must be a non-empty mapping"),
    ({"THCS": None}, "THCS must be a non-empty mapping"),
])
def test_bad_syllabus(tmp_path, syllabus, message):
    path = tmp_path / "syllabus.yaml"
    path.write_text(yaml.safe_dump(syllabus, allow_unicode=True), encoding="utf-8")
    with pytest.raises(ConfigKeyError, match=message):
        read_syllabus(path)


@pytest.mark.parametrize("tasks, message", [
    ([{"name": "a", "instructions": "x", "samples": 2, "keep": 3}], "1 <= keep <= samples"),
    ([{"name": "a", "instructions": "x"}, {"name": "a", "instructions": "y"}], "distinct names"),
    ([{"name": "a b", "instructions": "x"}], "letters, digits and underscores"),
    ([{"name": "a", "instructions": "x", "answer_check": "exact"}], "answer_check"),
    ([{"name": "a", "instruction": "x"}], "did you mean 'tasks\\[0\\].instructions'"),
])
def test_bad_tasks(tmp_path, tasks, message):
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks}), encoding="utf-8")
    with pytest.raises(ConfigKeyError, match=message):
        read_tasks(path)


def test_task_without_topics(tmp_path):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"tasks": [{"name": "a", "instructions": "x", "subjects": ["Hóa học"]}]}))
    with pytest.raises(ConfigKeyError, match="no syllabus topic has a subject in"):
        jobs(read_tasks(tasks), [Topic("THCS", "Lớp 6", "Toán", "Số nguyên")])
