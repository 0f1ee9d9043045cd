"""Off-policy distillation with the teacher behind an OpenAI-compatible endpoint: qforge's own server scoring the
tiny teacher must give the local teacher's top-k; a scripted vLLM-style server checks the wire handling (token
ids, the prompt token riding along, suppressed ids, re-tokenised prompts, capped top-k, text tokens, resume)."""
import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from test_distill import _config, _losses, few_rows, teacher  # noqa: F401 (fixtures)
from tiny_run import tiny_overrides, tiny_run_files  # noqa: F401 (fixture)

from qforge.engine import load_model
from qforge.engine.serve.chat import ChatModel
from qforge.engine.serve.client import ChatClient
from qforge.engine.config_io import load_config
from qforge.engine.data import ChatTemplate
from qforge.engine.data.example import make_example
from qforge.engine.errors import ConfigError, EndpointError
from qforge.engine.serve.app import serve_model
from qforge.engine.serve.app import BackgroundServer, openai_error
from qforge.engine.serve.protocol import APIError
from qforge.engine.train.distill import teacher_top_k
from qforge.engine.train.sft import load_sft_data
from qforge.engine.train.parallel import Dist
from qforge.engine.train.teacher_endpoint import EndpointTeacher
from qforge.recipes.distill import DistillConfig, main as distill_main

K = 8


@pytest.fixture(scope="module")
def served_teacher(teacher):
    """The tiny teacher on qforge's server (fp32, one torch thread against the client's threads)."""
    chat_model = ChatModel.load(teacher)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with serve_model(chat_model) as server:
            yield server.url, chat_model.name
    finally:
        torch.set_num_threads(threads)


def _assert_same_top_k(examples, scored, local):
    assert len(scored) == len(local) == len(examples)
    for example, (ids, logprobs), (local_ids, local_logprobs) in zip(examples, scored, local):
        assert ids.shape == local_ids.shape == (example.num_loss_tokens - (example.labels[0] != -100), K)
        np.testing.assert_allclose(logprobs, local_logprobs, atol=1e-4, rtol=0)
        gaps = np.diff(local_logprobs, axis=1)
        untied = np.ones_like(local_ids, dtype=bool)  # a column whose value is within 1e-4 of a neighbour may swap
        untied[:, 1:] &= gaps < -1e-4
        untied[:, :-1] &= gaps < -1e-4
        assert untied.mean() > 0.5
        assert np.array_equal(ids[untied], local_ids[untied])


def _examples_of(few_rows, teacher, tmp_path):
    template = ChatTemplate.from_pretrained(teacher)
    return load_sft_data(_config(few_rows, tmp_path / "out", teacher), template, Dist())[0][0], template.tokenizer


def test_endpoint_top_k_equals_the_local_teacher(few_rows, teacher, served_teacher, tmp_path):
    examples, tokenizer = _examples_of(few_rows, teacher, tmp_path)
    local = teacher_top_k(load_model(teacher, dtype=torch.float32), examples, K, 768, torch.device("cpu"))
    client = ChatClient(*served_teacher, concurrency=2)
    _assert_same_top_k(examples, EndpointTeacher(client).top_k(examples, K, tokenizer, tmp_path / "partial"), local)


def test_a_pruned_teacher_on_qforge_server_equals_the_local_restricted_teacher(few_rows, teacher, tmp_path):
    """Suppressed ids (the teacher's unkept head rows) leave its softmax on qforge's server as in `teacher_top_k`
    over the kept ids; a prompt token among them is scored −inf, sent as vLLM's −9999."""
    examples, tokenizer = _examples_of(few_rows, teacher, tmp_path)
    model = load_model(teacher, dtype=torch.float32)
    full = teacher_top_k(model, examples, K, 768, torch.device("cpu"))
    suppressed = sorted({int(i) for ids, _ in full for i in ids[:, :2].ravel()} | {int(examples[0].input_ids[3])})
    kept = torch.ones(model.config.vocab_size, dtype=torch.bool)
    kept[suppressed] = False
    local = teacher_top_k(model, examples, K, 768, torch.device("cpu"), kept.nonzero().squeeze(1))
    with serve_model(ChatModel.load(teacher, suppress_ids=suppressed, name="pruned")) as server:
        scored = EndpointTeacher(ChatClient(server.url, "pruned")).top_k(examples, K, tokenizer, tmp_path / "p")
    assert not np.isin(np.concatenate([ids for ids, _ in scored]), suppressed).any()
    _assert_same_top_k(examples, scored, local)


# --- a scripted vLLM-style server -----------------------------------------------------------------------------
def _distribution(prompt: list[int], position: int, k: int) -> dict[int, float]:
    """The fake teacher's top-k at `position` (distinct ids, distinct log-probs), a function of the prefix."""
    rng = np.random.default_rng([position, *prompt[:position]])
    ids = rng.choice(np.arange(100, 5000), size=k, replace=False)
    logprobs = -np.sort(rng.uniform(0.1, 8.0, size=k))
    return dict(zip(ids.tolist(), logprobs.tolist()))


def vllm_style(body: dict, *, suppressed=(), edit=None, cap=None, as_text=None) -> dict:
    """What vLLM answers to a token-id prompt with echo, max_tokens=0, logprobs=k: per position the top-k plus
    the prompt's own token (k+1 entries when it is not among them), in no particular order."""
    prompt, k = body["prompt"], body["logprobs"]
    name = (lambda t: f"token_id:{t}") if body.get("return_tokens_as_token_ids") else as_text
    tops = [None]
    for position in range(1, len(prompt)):
        top = _distribution(prompt, position, k)
        top.setdefault(prompt[position], -20.0 - position)
        for token in suppressed:
            top[token] = max(top.values()) + 0.5  # a suppressed id the server does not know to drop
        entries = list(top.items())[:cap] if cap else list(top.items())
        np.random.default_rng(position).shuffle(entries)
        tops.append({name(t): v for t, v in entries})
    tokens = [name(t) for t in (edit(prompt) if edit else prompt)]
    return {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
            "choices": [{"index": 0, "text": "", "finish_reason": "length",
                         "logprobs": {"tokens": tokens, "token_logprobs": [None] * len(prompt), "top_logprobs": tops,
                                      "text_offset": [0] * len(prompt)}}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}}


class FakeServer(BackgroundServer):
    def __init__(self, respond):
        app = FastAPI()
        self.bodies = []

        @app.exception_handler(APIError)
        async def _error(request, error):
            return openai_error(error)

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            return respond(body)

        super().__init__(app)


def _examples(count: int = 3) -> list:
    """Token-id examples whose last half is supervised (labels unshifted, as the SFT data's)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        ids = rng.integers(100, 5000, size=12 + i)
        out.append(make_example(ids, np.arange(len(ids)) >= len(ids) // 2))
    return out


def _expected(example, k: int, suppressed=()):
    """The targets of each supervised token j ≥ 1: the top-k of the distribution at position j, sorted."""
    prompt = example.input_ids.tolist()
    ids, logprobs = [], []
    for position in np.flatnonzero(example.labels[1:] != -100) + 1:
        top = _distribution(prompt, int(position), k)
        top.setdefault(prompt[position], -20.0 - position)
        for token in suppressed:
            top[token] = max(top.values()) + 0.5
        pairs = sorted(top.items(), key=lambda p: -p[1])[:k]
        ids.append([-1 if t in suppressed else t for t, _ in pairs])
        logprobs.append([0.0 if t in suppressed else v for t, v in pairs])
    return np.array(ids, dtype=np.int32), np.array(logprobs, dtype=np.float32)


def test_vllm_style_token_ids_are_aligned_sorted_and_suppressed_ids_dropped(tmp_path):
    examples = _examples()
    with FakeServer(lambda body: vllm_style(body, suppressed=(7,))) as server:
        teacher = EndpointTeacher(ChatClient(server.url, "teacher"), suppress_ids=[7])
        scored = teacher.top_k(examples, K, None, tmp_path / "partial")
    body = server.bodies[0]
    assert body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] == K
    assert body["return_tokens_as_token_ids"] is True and body["model"] == "teacher"
    assert sorted(b["prompt"] for b in server.bodies) == sorted(e.input_ids.tolist() for e in examples)
    for example, (ids, logprobs) in zip(examples, scored):
        expected_ids, expected_logprobs = _expected(example, K, suppressed=(7,))
        assert (ids[:, 0] == -1).all()  # the suppressed id led every row and was dropped, not renormalised in
        assert np.array_equal(ids, expected_ids)
        np.testing.assert_array_equal(logprobs, expected_logprobs)


def test_a_re_tokenised_prompt_is_refused_naming_the_example(tmp_path):
    def respond(body):
        changed = lambda prompt: prompt[:3] + [prompt[3] + 1] + prompt[4:] if len(prompt) == 13 else prompt  # noqa
        return vllm_style(body, edit=changed)

    with FakeServer(respond) as server, pytest.raises(EndpointError, match=r"example 1: the endpoint re-tokenised "
                                                                              r"the prompt \(position 3"):
        EndpointTeacher(ChatClient(server.url, "teacher")).top_k(_examples(), K, None, tmp_path / "partial")


def test_a_capped_top_k_names_the_setting_and_the_server_flag(tmp_path):
    with FakeServer(lambda body: vllm_style(body, cap=5)) as server, \
            pytest.raises(EndpointError, match=r"5 top log-probs at position 6 for distill.top_k=8.*--max-logprobs"):
        EndpointTeacher(ChatClient(server.url, "teacher")).top_k(_examples(1), K, None, tmp_path / "partial")


def test_text_tokens_map_through_the_tokenizer_unless_ambiguous(teacher, tmp_path):
    tokenizer = ChatTemplate.from_pretrained(teacher).tokenizer
    words = tokenizer.encode(" the cat sat on a mat and then went home to sleep all day", add_special_tokens=False).ids
    example = make_example(words, np.arange(len(words)) >= 4)
    k = 3
    plain = [t for t in range(300, 3000) if tokenizer.decode([t]).isascii() and t not in words]

    def respond(body, ambiguous=False):
        prompt = body["prompt"]
        tops = [None] + [{tokenizer.decode([t]): -float(c + 1) for c, t in enumerate([p, *plain[i * k:i * k + k - 1]])}
                         for i, p in enumerate(prompt[1:])]
        if ambiguous:
            tops[5] = {"\ufffd": -0.5, **tops[5]}  # what every partial UTF-8 byte decodes to
        return {"choices": [{"index": 0, "text": "", "logprobs": {
            "tokens": [tokenizer.decode([t]) for t in prompt], "top_logprobs": tops}}]}

    with FakeServer(respond) as server:
        teacher = EndpointTeacher(ChatClient(server.url, "teacher"), token_ids=False)
        [(ids, logprobs)] = teacher.top_k([example], k, tokenizer, tmp_path / "a")
    assert "return_tokens_as_token_ids" not in server.bodies[0]
    supervised = np.flatnonzero(example.labels[1:] != -100) + 1
    assert ids[:, 0].tolist() == [words[j] for j in supervised]
    assert ids[:, 1:].tolist() == [plain[(j - 1) * k:(j - 1) * k + k - 1] for j in supervised]
    assert logprobs.tolist() == [[-1.0, -2.0, -3.0]] * len(supervised)

    with FakeServer(lambda body: respond(body, ambiguous=True)) as server, \
            pytest.raises(EndpointError, match="names several token ids; set distill.teacher_token_ids=true"):
        EndpointTeacher(ChatClient(server.url, "teacher"), token_ids=False).top_k([example], k, tokenizer,
                                                                                   tmp_path / "b")


def test_an_interrupted_scoring_resumes_from_its_saved_chunks(tmp_path):
    examples = _examples(5)
    failing = {"on": True}

    def respond(body):
        if failing["on"] and len(body["prompt"]) == 16:  # the fifth example
            raise APIError(400, "scripted failure")
        return vllm_style(body)

    with FakeServer(respond) as server:
        teacher = EndpointTeacher(ChatClient(server.url, "teacher", max_retries=0), chunk=2)
        with pytest.raises(EndpointError, match="example 4: .*scripted failure"):
            teacher.top_k(examples, K, None, tmp_path / "partial")
        assert len(list((tmp_path / "partial").glob("*.npz"))) == 2
        failing["on"], sent = False, len(server.bodies)
        scored = teacher.top_k(examples, K, None, tmp_path / "partial")
    assert [b["prompt"] for b in server.bodies[sent:]] == [examples[4].input_ids.tolist()]  # only the lost chunk
    for example, (ids, logprobs) in zip(examples, scored):
        expected_ids, expected_logprobs = _expected(example, K)
        assert np.array_equal(ids, expected_ids) and np.array_equal(logprobs, expected_logprobs)


def test_ranks_request_disjoint_shares_of_the_chunks_and_read_the_same_result(tmp_path):
    """Under torchrun each rank requests every world-th chunk; after the barrier all chunks are read as one."""
    examples = _examples(5)
    with FakeServer(vllm_style) as server:
        teacher = EndpointTeacher(ChatClient(server.url, "teacher", max_retries=0), chunk=2)
        prompts = []
        for rank in range(2):
            sent = len(server.bodies)
            teacher.score_chunks(examples, K, None, tmp_path / "partial", progress=False, rank=rank, world=2)
            prompts.append(sorted(b["prompt"] for b in server.bodies[sent:]))  # concurrent within a chunk
        sent = len(server.bodies)
        scored = teacher.read_chunks(examples, tmp_path / "partial")
        assert len(server.bodies) == sent  # reading requests nothing
    ids_of = [e.input_ids.tolist() for e in examples]
    assert prompts == [sorted(ids_of[0:2] + ids_of[4:5]), sorted(ids_of[2:4])]  # chunks 0 and 2 / chunk 1
    for example, (ids, logprobs) in zip(examples, scored):
        expected_ids, expected_logprobs = _expected(example, K)
        assert np.array_equal(ids, expected_ids) and np.array_equal(logprobs, expected_logprobs)


# --- the recipe -------------------------------------------------------------------------------------------------
def _endpoint(url="http://127.0.0.1:9/v1", model="teacher"):
    return {"distill.teacher_endpoint.base_url": url, "distill.teacher_endpoint.model": model}


def test_config_needs_exactly_one_teacher_and_off_policy(few_rows, teacher, tmp_path):
    overrides = lambda **extra: tiny_overrides(few_rows, tmp_path, **extra)  # noqa: E731
    with pytest.raises(ConfigError, match="exactly one of distill.teacher .* or distill.teacher_endpoint"):
        load_config(DistillConfig, None, overrides(**{"distill.teacher": str(teacher), **_endpoint()}))
    with pytest.raises(ConfigError, match="exactly one of distill.teacher"):
        load_config(DistillConfig, None, overrides())
    with pytest.raises(ConfigError, match="on_policy needs a local distill.teacher: .*full distribution"):
        load_config(DistillConfig, None, overrides(**{"distill.mode": "on_policy", **_endpoint()}))
    with pytest.raises(ConfigError, match="distill.teacher_endpoint.model .* is required"):
        load_config(DistillConfig, None, overrides(**{"distill.teacher_endpoint.base_url": "http://x/v1"}))


def test_recipe_distils_from_the_endpoint(few_rows, teacher, served_teacher, tmp_path):
    url, name = served_teacher
    settings = {**_endpoint(url, name), "distill.top_k": K, "data.max_tokens": 400, "train.max_steps": 3,
                "distill.teacher_dir": str(tmp_path / "teacher")}
    (tmp_path / "empty.yaml").write_text("{}")
    assert distill_main(["--config", str(tmp_path / "empty.yaml")] + tiny_overrides(few_rows, tmp_path / "out",
                                                                                     **settings)) == 0
    losses = _losses(tmp_path / "out")
    assert len(losses) == 3 and all(np.isfinite(loss) and loss > 0 for loss in losses)
    assert (tmp_path / "out/final/model.safetensors").is_file()
    [stored] = [p for p in (tmp_path / "teacher").iterdir()]  # the result only; the partial chunks are gone
    assert not stored.name.startswith(".") and np.load(stored / "ids.npy").shape[1] == K

    # the stored targets are the local teacher's, so the loss is the local teacher's first loss
    local_settings = {**{k: v for k, v in settings.items() if "teacher_endpoint" not in k},
                      "distill.teacher": str(teacher), "distill.teacher_dir": str(tmp_path / "local"),
                      "train.max_steps": 1}
    assert distill_main(["--config", str(tmp_path / "empty.yaml")] + tiny_overrides(few_rows, tmp_path / "local_out",
                                                                                     **local_settings)) == 0
    assert abs(_losses(tmp_path / "local_out")[0] - losses[0]) < 1e-4 * max(1.0, losses[0])


def test_qforge_server_names_tokens_by_id_on_request(served_teacher, teacher):
    """vLLM's `return_tokens_as_token_ids` through the openai SDK: the same logprobs, tokens named "token_id:N"."""
    import openai

    url, name = served_teacher
    tokenizer = ChatTemplate.from_pretrained(teacher).tokenizer
    client = openai.OpenAI(base_url=url, api_key="EMPTY")
    prompt = tokenizer.encode("Xin chào, 2 + 3 = 5", add_special_tokens=False).ids
    replies = [client.completions.create(model=name, prompt=prompt, echo=True, max_tokens=0, logprobs=3,
                                         extra_body={"return_tokens_as_token_ids": flag}) for flag in (False, True)]
    as_text, as_ids = (reply.choices[0].logprobs for reply in replies)
    assert as_ids.tokens == [f"token_id:{t}" for t in prompt]
    assert as_text.tokens == [tokenizer.decode([t]) for t in prompt]
    assert as_ids.token_logprobs == as_text.token_logprobs
    for text_top, id_top in zip(as_text.top_logprobs[1:], as_ids.top_logprobs[1:]):
        decoded = {tokenizer.decode([int(key.removeprefix("token_id:"))]): value for key, value in id_top.items()}
        assert decoded == text_top
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          logprobs=True, top_logprobs=2, temperature=0,
                                          extra_body={"return_tokens_as_token_ids": True})
    assert all(entry.token.startswith("token_id:") and all(t.token.startswith("token_id:") for t in entry.top_logprobs)
               for entry in chat.choices[0].logprobs.content)


def test_a_chunk_write_that_fails_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    """Scored chunks are written through engine/files.py: a failure midway leaves neither the chunk nor a temp file."""
    import numpy as np

    from qforge.engine.train import teacher_endpoint

    def half_then_fail(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", half_then_fail)
    scored = [(np.zeros((3, 2), np.int64), np.zeros((3, 2)))]
    with pytest.raises(OSError, match="disk full"):
        teacher_endpoint._save_chunk(tmp_path / "0000000000-1.npz", scored, 2)
    assert list(tmp_path.iterdir()) == []
