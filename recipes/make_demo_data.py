"""Generates the embedded demo dataset: Vietnamese elementary-school arithmetic word problems.

The README's main job trains a tiny randomly initialised Qwen3 on CPU for a few minutes, so the problems use
small numbers, one operation each, and a short, regular answer ("Vậy ... Đáp án: N") that such a model can
learn; the step-by-step reasoning goes to `reasoning_content` (rendered as `<think>` by the chat template).
Every row also carries the checkable `answer` and a `meta` record (template, operation, operands) so tests can
recompute it. The output is a pure function of the seed:

    python recipes/make_demo_data.py --out recipes/data

`extract_answer` is the exact-match checker the trainer's demo evaluation applies to generated text.
"""
import argparse
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qforge.engine.files import write_jsonl

SEED = 20240521
TRAIN_ROWS = 3000
EVAL_ROWS = 64
RL_ROWS = 1000  # GRPO's prompts (recipes/configs/grpo.yaml): problems the SFT run never saw
SYSTEM_PROMPT = "Bạn là trợ lý giải toán tiểu học."
SYSTEM_PROMPT_SHARE = 0.1
MAX_ATTEMPTS = 200

NAMES = ("Lan", "Minh", "Hoa", "Nam", "An", "Bình", "Mai", "Hùng", "Linh", "Tuấn", "Hà", "Dũng")
GIVERS = ("mẹ", "bố", "bà", "ông", "chị", "anh", "cô giáo")
ITEMS = (("quả", "táo"), ("quả", "cam"), ("cái", "kẹo"), ("viên", "bi"), ("bông", "hoa"), ("quyển", "vở"),
         ("cái", "bút chì"), ("con", "tem"), ("quyển", "truyện"), ("cái", "bánh"))
GOODS = ("quyển vở", "cái bút", "hộp bút màu", "quyển truyện", "cái thước kẻ")
PLACES = ("chợ", "bưu điện", "công viên", "thư viện")
TREES = ("cam", "bưởi", "chuối", "xoài")
ELDERS = ("mẹ", "bố", "cô")

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b, ":": lambda a, b: a // b}


def small_sum(rng):
    return rng.randint(1, 50), rng.randint(1, 50)


def positive_difference(rng):
    a = rng.randint(2, 50)
    return a, rng.randint(1, a - 1)


def times_table(rng):
    return rng.randint(2, 10), rng.randint(2, 10)


def exact_division(rng):
    """Dividend ≤ 50 with a whole quotient ≥ 2, as in the grade-2/3 division tables."""
    divisor = rng.randint(2, 9)
    return divisor * rng.randint(2, 50 // divisor), divisor


def class_halves(rng):
    return rng.randint(10, 25), rng.randint(10, 25)


def class_absence(rng):
    return rng.randint(20, 45), rng.randint(1, 8)


def elder_age(rng):
    return rng.randint(5, 11), rng.randint(20, 35)


DEFAULT_OPERANDS = {"+": small_sum, "-": positive_difference, "×": times_table, ":": exact_division}


@dataclass(frozen=True)
class Template:
    """One kind of word problem; the texts are format strings over the slots drawn in `make_row`.

    The reasoning always contains the equation "{a} <op> {b} = {n}", in that order.
    """
    name: str
    op: str
    question: str
    reasoning: str
    conclusion: str
    operands: Callable | None = None


TEMPLATES = (
    Template("cho_them", "+",
             "{name} có {a} {cls} {noun}, {giver} cho thêm {b} {cls} {noun}. "
             "Hỏi {name} có tất cả bao nhiêu {cls} {noun}?",
             "{name} có {a} {cls} {noun}, {giver} cho thêm {b} {cls}. Số {noun} là {a} + {b} = {n}.",
             "Vậy {name} có tất cả {n} {cls} {noun}."),
    Template("hai_ban_gop", "+",
             "{name} có {a} {cls} {noun}, {name2} có {b} {cls} {noun}. Hỏi cả hai bạn có bao nhiêu {cls} {noun}?",
             "{name} có {a} {cls}, {name2} có {b} {cls}. Cả hai bạn có {a} + {b} = {n} {cls} {noun}.",
             "Vậy cả hai bạn có {n} {cls} {noun}."),
    Template("lop_hoc", "+",
             "Lớp của {name} có {a} học sinh nam và {b} học sinh nữ. "
             "Hỏi lớp của {name} có tất cả bao nhiêu học sinh?",
             "Lớp có {a} học sinh nam và {b} học sinh nữ. Số học sinh là {a} + {b} = {n}.",
             "Vậy lớp của {name} có {n} học sinh.", class_halves),
    Template("di_cho", "+",
             "{giver_cap} mua rau hết {a} nghìn đồng và mua thịt hết {b} nghìn đồng. "
             "Hỏi {giver} đã tiêu hết bao nhiêu nghìn đồng?",
             "Mua rau hết {a} nghìn đồng, mua thịt hết {b} nghìn đồng. Số tiền là {a} + {b} = {n} nghìn đồng.",
             "Vậy {giver} đã tiêu hết {n} nghìn đồng."),
    Template("quang_duong_tong", "+",
             "Quãng đường từ nhà {name} đến {place} dài {a} km, từ {place} đến trường dài {b} km. "
             "Hỏi quãng đường từ nhà {name} qua {place} đến trường dài bao nhiêu ki-lô-mét?",
             "Từ nhà đến {place} dài {a} km, từ {place} đến trường dài {b} km. "
             "Quãng đường là {a} + {b} = {n} km.",
             "Vậy quãng đường dài {n} km."),
    Template("nhieu_hon", "+",
             "{name} có {a} {cls} {noun}, {name2} có nhiều hơn {name} {b} {cls} {noun}. "
             "Hỏi {name2} có bao nhiêu {cls} {noun}?",
             "{name2} có nhiều hơn {name} {b} {cls}. Số {noun} của {name2} là {a} + {b} = {n}.",
             "Vậy {name2} có {n} {cls} {noun}."),
    Template("tuoi", "+",
             "Năm nay {name} {a} tuổi, {elder} hơn {name} {b} tuổi. Hỏi năm nay {elder} bao nhiêu tuổi?",
             "{name} {a} tuổi, {elder} hơn {name} {b} tuổi. Tuổi của {elder} là {a} + {b} = {n}.",
             "Vậy năm nay {elder} {n} tuổi.", elder_age),
    Template("cho_ban", "-",
             "{name} có {a} {cls} {noun}, {name} cho bạn {b} {cls} {noun}. "
             "Hỏi {name} còn lại bao nhiêu {cls} {noun}?",
             "{name} có {a} {cls} {noun}, cho bạn {b} {cls}. Số {noun} còn lại là {a} - {b} = {n}.",
             "Vậy {name} còn lại {n} {cls} {noun}."),
    Template("nghi_hoc", "-",
             "Lớp của {name} có {a} học sinh, hôm nay có {b} bạn nghỉ học. "
             "Hỏi hôm nay lớp có bao nhiêu bạn đi học?",
             "Lớp có {a} học sinh, {b} bạn nghỉ học. Số bạn đi học là {a} - {b} = {n}.",
             "Vậy hôm nay có {n} bạn đi học.", class_absence),
    Template("mua_do", "-",
             "{name} có {a} nghìn đồng, {name} mua một {goods} hết {b} nghìn đồng. "
             "Hỏi {name} còn lại bao nhiêu nghìn đồng?",
             "{name} có {a} nghìn đồng, mua {goods} hết {b} nghìn đồng. "
             "Số tiền còn lại là {a} - {b} = {n} nghìn đồng.",
             "Vậy {name} còn lại {n} nghìn đồng."),
    Template("quang_duong_con_lai", "-",
             "Quãng đường từ nhà {name} đến nhà {giver} dài {a} km. {name} đã đi được {b} km. "
             "Hỏi {name} còn phải đi bao nhiêu ki-lô-mét nữa?",
             "Quãng đường dài {a} km, đã đi {b} km. Còn phải đi {a} - {b} = {n} km.",
             "Vậy {name} còn phải đi {n} km nữa."),
    Template("it_hon", "-",
             "{name} có {a} {cls} {noun}, {name2} có ít hơn {name} {b} {cls} {noun}. "
             "Hỏi {name2} có bao nhiêu {cls} {noun}?",
             "{name2} có ít hơn {name} {b} {cls}. Số {noun} của {name2} là {a} - {b} = {n}.",
             "Vậy {name2} có {n} {cls} {noun}."),
    Template("hon_bao_nhieu", "-",
             "{name} có {a} {cls} {noun}, {name2} có {b} {cls} {noun}. "
             "Hỏi {name} có nhiều hơn {name2} bao nhiêu {cls} {noun}?",
             "{name} có {a} {cls}, {name2} có {b} {cls}. Số {noun} nhiều hơn là {a} - {b} = {n}.",
             "Vậy {name} có nhiều hơn {name2} {n} {cls} {noun}."),
    Template("mua_nhieu", "×",
             "Mỗi {goods} giá {a} nghìn đồng. {name} mua {b} {goods}. Hỏi {name} phải trả bao nhiêu nghìn đồng?",
             "Mỗi {goods} giá {a} nghìn đồng, mua {b} {goods}. Số tiền là {a} × {b} = {n} nghìn đồng.",
             "Vậy {name} phải trả {n} nghìn đồng."),
    Template("xe_dap", "×",
             "Mỗi giờ {name} đi xe đạp được {a} km. Hỏi trong {b} giờ {name} đi được bao nhiêu ki-lô-mét?",
             "Mỗi giờ đi được {a} km, đi trong {b} giờ. Quãng đường là {a} × {b} = {n} km.",
             "Vậy {name} đi được {n} km."),
    Template("gap_len", "×",
             "{name} có {a} {cls} {noun}, số {noun} của {name2} gấp {b} lần số {noun} của {name}. "
             "Hỏi {name2} có bao nhiêu {cls} {noun}?",
             "Số {noun} của {name2} gấp {b} lần của {name}. Số {noun} của {name2} là {a} × {b} = {n}.",
             "Vậy {name2} có {n} {cls} {noun}."),
    Template("vuon_cay", "×",
             "Vườn nhà {name} có {a} hàng cây {tree}, mỗi hàng có {b} cây. "
             "Hỏi vườn nhà {name} có tất cả bao nhiêu cây {tree}?",
             "Có {a} hàng, mỗi hàng {b} cây. Số cây là {a} × {b} = {n}.",
             "Vậy vườn nhà {name} có {n} cây {tree}."),
    Template("hop_do", "×",
             "Mỗi hộp có {a} {cls} {noun}. Hỏi {b} hộp như thế có bao nhiêu {cls} {noun}?",
             "Mỗi hộp có {a} {cls}, có {b} hộp. Số {noun} là {a} × {b} = {n}.",
             "Vậy {b} hộp có {n} {cls} {noun}."),
    Template("chia_deu", ":",
             "{giver_cap} có {a} {cls} {noun}, chia đều cho {b} bạn. Hỏi mỗi bạn được mấy {cls} {noun}?",
             "{a} {cls} {noun} chia đều cho {b} bạn. Mỗi bạn được {a} : {b} = {n} {cls}.",
             "Vậy mỗi bạn được {n} {cls} {noun}."),
    Template("xep_hang", ":",
             "Lớp của {name} có {a} học sinh xếp đều thành {b} hàng. Hỏi mỗi hàng có bao nhiêu học sinh?",
             "{a} học sinh xếp đều thành {b} hàng. Mỗi hàng có {a} : {b} = {n} học sinh.",
             "Vậy mỗi hàng có {n} học sinh."),
    Template("xep_tui", ":",
             "{name} có {a} {cls} {noun}, xếp vào các túi, mỗi túi {b} {cls}. Hỏi {name} xếp được bao nhiêu túi?",
             "Có {a} {cls} {noun}, mỗi túi {b} {cls}. Số túi là {a} : {b} = {n}.",
             "Vậy {name} xếp được {n} túi."),
    Template("gap_may_lan", ":",
             "{name} có {a} {cls} {noun}, {name2} có {b} {cls} {noun}. "
             "Hỏi số {noun} của {name} gấp mấy lần số {noun} của {name2}?",
             "{name} có {a} {cls}, {name2} có {b} {cls}. Số lần là {a} : {b} = {n}.",
             "Vậy số {noun} của {name} gấp {n} lần số {noun} của {name2}."),
    Template("giam_lan", ":",
             "{name} có {a} {cls} {noun}, số {noun} của {name2} bằng số {noun} của {name} giảm đi {b} lần. "
             "Hỏi {name2} có bao nhiêu {cls} {noun}?",
             "Số {noun} của {name} giảm đi {b} lần. Số {noun} của {name2} là {a} : {b} = {n}.",
             "Vậy {name2} có {n} {cls} {noun}."),
)


def make_row(template: Template, rng: random.Random) -> dict:
    """One problem from `template`, with its answer, reasoning and `meta`; ~10% also get the system prompt."""
    a, b = (template.operands or DEFAULT_OPERANDS[template.op])(rng)
    n = OPERATIONS[template.op](a, b)
    name, name2 = rng.sample(NAMES, 2)
    giver = rng.choice(GIVERS)
    cls, noun = rng.choice(ITEMS)
    slots = dict(a=a, b=b, n=n, name=name, name2=name2, giver=giver, giver_cap=giver[0].upper() + giver[1:],
                 cls=cls, noun=noun, goods=rng.choice(GOODS), place=rng.choice(PLACES),
                 tree=rng.choice(TREES), elder=rng.choice(ELDERS))
    messages = [
        {"role": "user", "content": template.question.format(**slots)},
        {"role": "assistant", "content": f"{template.conclusion.format(**slots)} Đáp án: {n}",
         "reasoning_content": template.reasoning.format(**slots)},
    ]
    if rng.random() < SYSTEM_PROMPT_SHARE:
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    meta = {"template": template.name, "op": template.op, "a": a, "b": b}
    return {"messages": messages, "answer": str(n), "meta": meta}


def question_of(row: dict) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def generate_rows(count: int, rng: random.Random, taken: set[str], templates=TEMPLATES) -> list[dict]:
    """`count` rows cycling through `templates` (so each is equally represented); questions already in
    `taken` are redrawn, and the new ones are added to it."""
    rows = []
    while len(rows) < count:
        template = templates[len(rows) % len(templates)]
        for _ in range(MAX_ATTEMPTS):
            row = make_row(template, rng)
            if question_of(row) not in taken:
                break
        else:
            raise RuntimeError(f"template {template.name!r} ran out of distinct questions; lower the row count")
        taken.add(question_of(row))
        rows.append(row)
    return rows


def build_splits(seed: int = SEED, train_rows: int = TRAIN_ROWS, eval_rows: int = EVAL_ROWS, rl_rows: int = RL_ROWS):
    """(train, eval, rl) row lists with no question in common; a pure function of the arguments. The RL split is
    drawn last, so adding it left the train and eval files as they were."""
    rng = random.Random(seed)
    taken: set[str] = set()
    eval_split = generate_rows(eval_rows, rng, taken)
    train_split = generate_rows(train_rows, rng, taken)
    rng.shuffle(train_split)
    rl_split = generate_rows(rl_rows, rng, taken)
    rng.shuffle(rl_split)
    return train_split, eval_split, rl_split


ANSWER_MARK = re.compile(r"đáp\s*án", re.IGNORECASE)
# Filler allowed between the mark and the number ("Đáp án: 19", "Đáp án là 19", "**Đáp án:** 19"), then an
# integer with optional thousands groups ("1.000"); a decimal ("2,5") is deliberately not an integer match.
ANSWER_NUMBER = re.compile(r"[\s:：=*]*(?:là[\s:=*]*)?([-−]?)(\d+(?:[.,]\d{3})*)(?![.,]?\d)")


def extract_answer(text: str) -> str | None:
    """The integer after the last "Đáp án:" in `text`, normalised ("007" → "7", "1.000" → "1000"), or None
    when the last mark is not followed by an integer."""
    text = unicodedata.normalize("NFC", text)
    marks = list(ANSWER_MARK.finditer(text))
    if not marks:
        return None
    match = ANSWER_NUMBER.match(text, marks[-1].end())
    if match is None:
        return None
    value = int(re.sub(r"[.,]", "", match.group(2)))
    return str(-value if match.group(1) else value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data",
                        help="output folder (default: recipes/data)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train-rows", type=int, default=TRAIN_ROWS)
    parser.add_argument("--eval-rows", type=int, default=EVAL_ROWS)
    parser.add_argument("--rl-rows", type=int, default=RL_ROWS)
    args = parser.parse_args(argv)
    splits = build_splits(args.seed, args.train_rows, args.eval_rows, args.rl_rows)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("vi_arith_train.jsonl", "vi_arith_eval.jsonl", "vi_arith_rl.jsonl"), splits):
        write_jsonl(args.out / name, rows)
        print(f"wrote {len(rows)} rows to {args.out / name}")


if __name__ == "__main__":
    main()
