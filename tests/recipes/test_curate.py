"""recipes/curate.py on a hand-written corpus: every rule, keyword and LLM task labels, quotas, the mixture."""
import copy
import json
import shlex
import threading

import pytest
import yaml

from qwen3_fixtures import run_recipe_main
from qforge.engine.config_io import apply_overrides, build, read_yaml
from qforge.engine.data.formats import read_conversations
from scripted_server import ChatServer, ScriptedBackend

from qforge.recipes.fft import FFTRecipeConfig
from qforge.recipes.curate import Sampling, main, sample, sampling_summary
from qforge.recipes.fft import stage_configs

ANSWER = "Ta thực hiện phép tính cẩn thận từng bước, vậy kết quả cuối cùng là mười hai."


def chat(prompt, answer=ANSWER):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


CANDY = "Lan có 5 cái kẹo, mẹ cho Lan thêm 7 cái kẹo nữa vào buổi chiều. Hỏi lúc này Lan có tất cả bao nhiêu cái kẹo?"
MESSAGES_ROWS = [  # (row, expected task or drop reason)
    (chat(CANDY), "math_word_problem"),
    (chat("Tính giá trị của biểu thức 48 : 4 bằng cách nhẩm."), "computation"),
    (chat("Quang hợp là gì? Hãy trả lời ngắn gọn cho học sinh lớp năm."), "concept_explanation"),
    (chat("Kể cho mình nghe một câu chuyện cổ tích về lòng biết ơn."), "unlabelled"),
    (chat("Bạn thích nghe loại nhạc nào nhất trong mùa hè này?"), "unlabelled"),
    (chat("What is photosynthesis? Answer briefly for a fifth grader."), "prompt_not_vietnamese"),
    (chat("Tính tổng hai số mười và hai.", "Kết quả là 12, tức là 十二 theo cách viết khác."), "answer_cjk"),
    (chat("Tính nhanh tổng của 6 và 6 giúp mình.", "Mười hai."), "answer_too_short"),
    (chat("Vì sao bầu trời có màu xanh vào ban ngày?",
          "Là một mô hình ngôn ngữ, tôi không nhìn thấy bầu trời nhưng có thể giải thích điều này."),
     "banned_phrase"),
    (chat("Giải thích vì sao nước sôi ở một trăm độ.", "Nước sôi ở một trăm độ.\n" * 4), "repetitive_answer"),
    (chat("  " + CANDY.lower().replace(",", " ;")), "exact_duplicate"),  # case, spaces, punctuation
    (chat(CANDY.replace("kẹo?", "kẹo vậy?")), "near_duplicate"),
    ({"messages": [{"role": "user", "content": "Chỉ có câu hỏi thôi, không có trả lời."}]}, "bad_row"),
    ({"messages": [{"role": "user", "content": "Xin chào"}, {"role": "assistant", "content": ANSWER}] * 20},
     "message_count"),
]
SHAREGPT_ROWS = [
    ({"conversations": [{"from": "human", "value": "Hãy so sánh hai phân số 2/3 và 3/4 giúp em."},
                        {"from": "gpt", "value": ANSWER}]}, "compare_contrast"),
    ({"conversations": [{"from": "human", "value": "Tính 15 × 4 bằng bao nhiêu?"},
                        {"from": "gpt", "value": ANSWER}]}, "computation"),
]
RULES = ("[{task: math_word_problem, patterns: ['hỏi.*bao nhiêu']}, {task: computation, patterns: ['tính']},"
         " {task: concept_explanation, patterns: ['là gì', 'vì sao']},"
         " {task: compare_contrast, patterns: ['so sánh']}]")


def write_corpus(tmp_path):
    messages, sharegpt = tmp_path / "messages.jsonl", tmp_path / "sharegpt.jsonl"
    messages.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in MESSAGES_ROWS) + "{not json\n",
                        encoding="utf-8")
    sharegpt.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in SHAREGPT_ROWS), encoding="utf-8")
    return messages, sharegpt


def run_curate(tmp_path, *overrides):
    messages, sharegpt = write_corpus(tmp_path)
    out = tmp_path / "out"
    run_recipe_main(main, ["--config", "recipes/configs/curate.yaml", f"output.dir={out}",
          f"inputs=[{{path: '{messages}'}}, {{path: '{sharegpt}', format: sharegpt}}]", f"tasks.rules={RULES}",
          "sampling.target=null", "sampling.quotas={}", *overrides])
    kept = [json.loads(line) for line in (out / "curated.jsonl").read_text(encoding="utf-8").splitlines()]
    drops = [json.loads(line) for line in (out / "drops.jsonl").read_text(encoding="utf-8").splitlines()]
    return kept, drops, json.loads((out / "report.json").read_text(encoding="utf-8")), out


def test_rules_labels_and_outputs(tmp_path):
    kept, drops, report, out = run_curate(tmp_path)
    messages, sharegpt = tmp_path / "messages.jsonl", tmp_path / "sharegpt.jsonl"
    expected = [(f"{messages}:{i}", label) for i, (_, label) in enumerate(MESSAGES_ROWS, 1)]
    expected += [(f"{messages}:{len(MESSAGES_ROWS) + 1}", "bad_row")]
    expected += [(f"{sharegpt}:{i}", label) for i, (_, label) in enumerate(SHAREGPT_ROWS, 1)]
    outcome = {row["id"]: row["task"] for row in kept} | {drop["id"]: drop["reason"] for drop in drops}
    unlabelled = {row_id for row_id, label in expected if label == "unlabelled"}
    assert outcome == {row_id: "other" if row_id in unlabelled else label for row_id, label in expected}
    assert next(d for d in drops if d["reason"] == "near_duplicate")["detail"] == f"of {messages}:1"
    assert kept[-1]["messages"][0] == {"role": "user", "content": "Tính 15 × 4 bằng bao nhiêu?"}  # ShareGPT → messages
    assert kept[-1]["source"] == {"path": str(sharegpt), "line": 2}
    assert len(list(read_conversations(out / "curated.jsonl"))) == len(kept) == 7

    counts = report["counts"]
    assert counts["ALL"]["kept"] == 7 and counts["ALL"]["dropped"] == 10
    assert counts["computation"] == {"kept": 2, "dropped": 2, "reasons": {"answer_cjk": 1, "answer_too_short": 1}}

    mixture = yaml.safe_load((out / "mixture.yaml").read_text(encoding="utf-8"))
    assert mixture == {"data": {"train": [str(out / "curated.jsonl")], "weights": [1.0]}}


def test_mixture_is_an_fft_config_fragment(tmp_path):
    _, _, report, out = run_curate(tmp_path, "mixture.weight=0.5",
                                   "mixture.extra=[{path: runs/synth/data.jsonl, weight: 2.0}]")
    demo = read_yaml("recipes/configs/demo.yaml")
    staged = tmp_path / "fft.yaml"  # the fragment as one stage of an FFT config
    staged.write_text(yaml.safe_dump({**demo, "stages": [{"name": "mix", **read_yaml(out / "mixture.yaml")}]}))
    [merged] = stage_configs(str(staged), [])
    assert merged.data.train == [str(out / "curated.jsonl"), "runs/synth/data.jsonl"]
    assert merged.data.weights == [0.5, 2.0]
    assert merged.data.eval == demo["data"]["eval"]  # the fragment touches only train and weights
    overrides = shlex.split(report["fft_overrides"])  # the command line printed in report.md
    assert build(FFTRecipeConfig, apply_overrides(copy.deepcopy(demo), overrides)).data == merged.data


class Classifier:
    """Labels stories 'writing'; answers the music question with chatter first, then a label."""

    def __init__(self):
        self.requests = []
        self.lock = threading.Lock()

    def __call__(self, request):
        with self.lock:
            self.requests.append(request.messages)
        prompt = request.messages[-1]["content"]
        if prompt.startswith("Invalid"):
            return "other"
        if "câu chuyện" in prompt:
            return "Nhãn: Writing"  # any case, around other words
        return "Có lẽ là computation hoặc writing"  # two labels: unusable, re-asked


def test_llm_classifier_labels_the_rows_no_rule_matched(tmp_path):
    classifier = Classifier()
    with ChatServer(ScriptedBackend(classifier, name="classifier"), port=0) as server:
        settings = (f"{{endpoint: {{base_url: '{server.url}', model: classifier}}, user: 'Labels: {{labels}}\n"
                    f"{{prompt}}', retry: 'Invalid ({{error}}). One label only.'}}")
        kept, _, report, _ = run_curate(tmp_path, f"tasks.classifier={settings}",
                                        "tasks.labels=[computation, writing, other]", "tasks.keep=[writing, other]")
    labels = {row["messages"][0]["content"][:10]: (row["task"], row["labelled_by"]) for row in kept}
    assert labels == {"Kể cho mìn": ("writing", "classifier"), "Bạn thích ": ("other", "classifier")}
    assert len(classifier.requests) == 3  # two rows + one re-ask; rule-labelled rows never reach the model
    assert all("Labels: computation, writing, other" in r[-1]["content"] for r in classifier.requests[:2])
    assert report["counts"]["computation"]["reasons"] == {"answer_cjk": 1, "answer_too_short": 1, "task_not_kept": 2}
    assert report["classifier_usage"]["replies"] == 3


def rows_of(task, n):
    return [{"id": f"{task}{i}", "task": task} for i in range(n)]


def test_quotas_then_the_rest_of_the_target():
    rows = rows_of("math", 30) + rows_of("computation", 30) + rows_of("other", 6) + rows_of("code", 4)
    kept, drops = sample(rows, Sampling(target=20, quotas={"math": 10, "computation": 0.25}, seed=3))
    by_task = {task: sum(r["task"] == task for r in kept) for task in ("math", "computation", "other", "code")}
    assert by_task["math"] == 10 and by_task["computation"] == 5 and by_task["other"] + by_task["code"] == 5
    reasons = {reason: sum(d["reason"] == reason for d in drops) for reason in ("over_quota", "not_sampled")}
    assert reasons == {"over_quota": 20 + 25, "not_sampled": 5}
    assert [r["id"] for r in kept] == sorted((r["id"] for r in kept), key=[r["id"] for r in rows].index)  # input order
    again, _ = sample(rows, Sampling(target=20, quotas={"math": 10, "computation": 0.25}, seed=3))
    assert again == kept and sample(rows, Sampling(target=20, seed=4))[0] != kept
    short, _ = sample(rows, Sampling(target=100, quotas={"code": 10}))  # a quota above what exists takes all
    assert len(short) == len(rows)
    assert sample(rows, Sampling()) == (rows, [])
    summary = sampling_summary(short, Sampling(target=100, quotas={"code": 10, "other": 0.05}))
    assert summary == {"target": 100, "kept": 70, "short": ["code"],
                       "quotas": {"code": {"wanted": 10, "kept": 4}, "other": {"wanted": 5, "kept": 6}}}


def test_parquet_input(tmp_path):
    path = tmp_path / "corpus.parquet"
    out = tmp_path / "out"
    args = ["--config", "recipes/configs/curate.yaml", f"output.dir={out}", f"inputs=[{{path: '{path}'}}]",
            "sampling.target=null", "sampling.quotas={}"]
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(SystemExit, match="reading Parquet needs pyarrow"):
            run_recipe_main(main, args)
        return
    rows = [SHAREGPT_ROWS[0][0], SHAREGPT_ROWS[1][0]]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    run_recipe_main(main, args)
    kept = [json.loads(line) for line in (out / "curated.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["messages"][0]["content"] for row in kept] == [r["conversations"][0]["value"] for r in rows]


def test_config_errors(tmp_path):
    with pytest.raises(SystemExit, match="sampling.quotas.math must be"):
        run_curate(tmp_path, "sampling.quotas={math: 1.5}")
    with pytest.raises(SystemExit, match="shares need sampling.target"):
        run_curate(tmp_path, "sampling.quotas={math: 0.5}")
    with pytest.raises(SystemExit, match="bad pattern"):
        run_curate(tmp_path, "tasks.rules=[{task: x, patterns: ['(unclosed']}]")
