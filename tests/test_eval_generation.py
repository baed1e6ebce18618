"""Generation: batched = unbatched, cache hits on rerun, MT-Bench turn order, prompt files."""

import copy
import json

import pytest
import torch

from rahf.data.schema import DataError
from rahf.evaluate.generation import GenerationCache, generate, generate_turns
from rahf.evaluate.prompts import load_prompts
from rahf.testing import tiny_model, tiny_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "How do I boil an egg?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about the quick brown fox."}],
]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_model(vocab_size=len(tokenizer)), tokenizer


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=3, progress=False)
    single = generate(model, tokenizer, CONVERSATIONS, max_new_tokens=6, batch_size=1, progress=False)
    assert batched == single
    assert tokenizer.padding_side == "right"  # left padding is built by hand, not left behind
    assert all(r.tokens <= 6 for r in batched)
    assert all(r.hit_limit == (r.tokens == 6) for r in batched)


def test_second_call_reads_the_cache(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    cache = GenerationCache(tmp_path / "cache")
    first = generate(model, tokenizer, CONVERSATIONS, max_new_tokens=5, cache=cache, progress=False)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == len(CONVERSATIONS)

    def no_generate(*args, **kwargs):
        raise AssertionError("model.generate called on a cache hit")

    monkeypatch.setattr(model, "generate", no_generate)
    assert generate(model, tokenizer, CONVERSATIONS, max_new_tokens=5, cache=cache, progress=False) == first
    with pytest.raises(AssertionError, match="cache hit"):  # other settings -> other key -> a miss
        generate(model, tokenizer, CONVERSATIONS, max_new_tokens=4, cache=cache, progress=False)


def test_cache_separates_weight_dtypes(tiny, tmp_path, monkeypatch):
    """The same model id in bf16 generates other greedy replies than in fp32: it must not hit fp32's entries."""
    model, tokenizer = tiny
    cache = GenerationCache(tmp_path / "cache")
    generate(model, tokenizer, CONVERSATIONS, max_new_tokens=5, cache=cache, model_id="same", progress=False)
    half = copy.deepcopy(model).to(torch.bfloat16)

    def no_generate(*args, **kwargs):
        raise AssertionError("model.generate called on a cache miss")

    monkeypatch.setattr(half, "generate", no_generate)
    with pytest.raises(AssertionError, match="cache miss"):
        generate(half, tokenizer, CONVERSATIONS, max_new_tokens=5, cache=cache, model_id="same", progress=False)


def test_sampling_is_seeded(tiny):
    model, tokenizer = tiny
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "progress": False}
    first = generate(model, tokenizer, CONVERSATIONS, seed=1, **kwargs)
    assert generate(model, tokenizer, CONVERSATIONS, seed=1, **kwargs) == first
    assert generate(model, tokenizer, CONVERSATIONS, seed=2, **kwargs) != first


def test_mt_bench_second_turn_sees_first_answer_in_order(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    path = tmp_path / "question.jsonl"
    rows = [
        {"question_id": 81, "category": "writing", "turns": ["Tell me about the fox.", "Now shorter, please."]},
        {"question_id": 82, "turns": ["What is 2+2?"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = load_prompts(path)
    assert prompts.format == "mt-bench"
    assert [item.n_turns for item in prompts.items] == [2, 1]

    seen = []  # decoded model inputs, per generate call
    original = model.generate

    def recording_generate(**kwargs):
        seen.extend(tokenizer.decode(row[row != tokenizer.pad_token_id]) for row in kwargs["input_ids"])
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    turns = generate_turns(model, tokenizer, prompts.items, max_new_tokens=6, progress=False)
    assert [(t.item_id, t.turn) for t in turns] == [("81", 0), ("81", 1), ("82", 0)]
    answer = turns[0].result.text
    assert answer.strip()
    assert [m["role"] for m in turns[1].conversation] == ["user", "assistant", "user"]
    assert turns[1].conversation[1]["content"] == answer
    second_prompt = seen[-1]  # turn 2 runs last, alone
    q1 = second_prompt.index("Tell me about the fox.")
    a1 = second_prompt.index(answer, q1)
    q2 = second_prompt.index("Now shorter, please.", a1)
    assert q1 < a1 < q2


def test_prompt_file_formats(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "plain text", "harmful": True},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "reference"}]},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "id": "x"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_prompts(path).items
    assert items[0].harmful and not items[1].harmful
    assert items[1].messages == ({"role": "user", "content": "hi"},)  # reference answer dropped
    assert items[2].id == "x" and items[2].messages[0]["role"] == "system"
    assert all(item.harmful for item in load_prompts(path, harmful=True).items)
    assert len(load_prompts(path, limit=2).items) == 2
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(DataError, match="p.jsonl:1"):
        load_prompts(path)
