"""The Python API: load with a speculative configuration, chat, lists of prompts, typed arguments
and one clear error for a prompt of the wrong kind."""

from __future__ import annotations

import inspect

import pytest
import torch

import specdecode
from specdecode import GenerationResult, SamplingParams, SpecConfig, SpecDecodeError, SpecDecoder

MODEL = "smollm2-135m-instruct"  # the smallest registry model
QUESTION = "List three colours, one per line."
# A prompt that repeats itself, so that prompt lookup has something to draft.
REPEATING = "Repeat this list exactly: red, green, blue, red, green, blue, red, green, blue."
GREEDY = SamplingParams(max_new_tokens=24)


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return specdecode.load(MODEL, spec=SpecConfig(drafter="prompt-lookup", controller="fixed"))


@pytest.fixture(scope="module")
def plain(llm: SpecDecoder) -> dict[str, GenerationResult]:
    """Each prompt's plain greedy decoding: the reference every speculative output must equal."""
    spec = SpecConfig(drafter="none")
    return {p: llm.generate(p, GREEDY, spec) for p in (QUESTION, REPEATING)}


def test_chat_equals_generate_of_the_templated_prompt(llm: SpecDecoder, plain) -> None:
    chat = llm.chat([{"role": "user", "content": REPEATING}], GREEDY)
    assert isinstance(chat, GenerationResult)
    assert chat.token_ids == plain[REPEATING].token_ids
    assert chat.text == plain[REPEATING].text and chat.text
    # A system turn goes through the template as generate's system prompt does.
    system = "You answer in lower case."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    ids = llm.encode_prompt(QUESTION, system=system)
    assert llm.chat(messages, GREEDY).token_ids == llm.generate(ids, GREEDY).token_ids


def test_a_list_of_prompts_gives_a_list_of_results(llm: SpecDecoder, plain) -> None:
    results = llm.generate([QUESTION, REPEATING], GREEDY)
    assert isinstance(results, list) and len(results) == 2
    for result, prompt in zip(results, [QUESTION, REPEATING], strict=True):
        assert result.token_ids == plain[prompt].token_ids
        assert result.text == plain[prompt].text


def test_a_bad_prompt_in_a_list_fails_before_any_is_generated(
    llm: SpecDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("generated before every prompt was checked")

    monkeypatch.setattr(llm, "_generate_one", must_not_run)
    with pytest.raises(SpecDecodeError, match="the prompt is empty"):
        llm.generate([QUESTION, "  "], GREEDY)


def test_token_ids_are_still_a_prompt(llm: SpecDecoder, plain) -> None:
    ids = llm.encode_prompt(QUESTION)
    assert llm.generate(ids, GREEDY).token_ids == plain[QUESTION].token_ids
    assert llm.generate(tuple(ids), GREEDY).token_ids == plain[QUESTION].token_ids


def test_the_spec_given_at_load_is_the_default_and_a_call_overrides_it(
    llm: SpecDecoder, plain
) -> None:
    assert llm.spec == SpecConfig(drafter="prompt-lookup", controller="fixed")
    drafted = llm.generate(REPEATING, GREEDY)
    assert drafted.token_ids == plain[REPEATING].token_ids
    assert drafted.stats.target_forwards < drafted.stats.new_tokens  # drafts were accepted
    # A per-call configuration wins: plain decoding takes one forward per token.
    override = llm.generate(REPEATING, GREEDY, SpecConfig(drafter="none"))
    assert override.stats.target_forwards == override.stats.new_tokens


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ([], "got an empty list"),
        ([1, "two"], "got a list of int, str"),
        ([[1, 2]], "got a list of list"),
        ([1.5], "got a list of float"),
        ([True, False], "got a list of bool"),
        (7, "got an int"),
    ],
)
def test_a_prompt_of_the_wrong_kind_is_one_clear_error(llm: SpecDecoder, prompt, fragment) -> None:
    with pytest.raises(SpecDecodeError, match="a prompt is a text, a list of token ids") as error:
        llm.generate(prompt, GREEDY)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_stream_takes_one_prompt(llm: SpecDecoder) -> None:
    with pytest.raises(SpecDecodeError, match="one prompt at a time"):
        llm.stream([QUESTION, REPEATING], GREEDY)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        ({"role": "user", "content": "hi"}, "non-empty list"),
        (["hello"], "message 1 is a str, not a dict"),
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ([{"role": "user"}], "no text content"),
        ([{"role": "user", "content": "  "}], "messages are empty"),
    ],
)
def test_bad_chat_messages_are_one_clear_error(llm: SpecDecoder, messages, fragment) -> None:
    with pytest.raises(SpecDecodeError) as error:
        llm.chat(messages, GREEDY)
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"spec": SpecConfig(drafter="draft-model")}, "needs a draft model"),
        ({"backend": "torch", "kernels": "narrow"}, "they go with backend llamacpp"),
        ({"backend": "llamacpp-narrow", "kernels": "wide"}, "already names its kernels"),
        ({"backend": "vulkan"}, "unknown backend 'vulkan'"),
        ({"kernels": "fast"}, "unknown kernels 'fast'"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
        ({"threads": 0}, "threads must be at least 1"),
        ({"dtype": "int4"}, "unknown dtype"),
    ],
)
def test_bad_load_options_fail_before_loading(options, fragment) -> None:
    with pytest.raises(SpecDecodeError) as error:
        specdecode.load("no-such-model-is-loaded", **options)
    assert fragment in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_cuda_is_refused_before_loading() -> None:
    with pytest.raises(SpecDecodeError, match="use --device cpu"):
        specdecode.load("no-such-model-is-loaded", device="cuda")


def test_the_default_controller_is_cost_aware_for_chains() -> None:
    assert SpecConfig().controller == "cost-aware"
    assert SpecConfig(drafter="draft-model").controller == "cost-aware"
    assert SpecConfig(drafter="draft-model", tree="static").controller == "heuristic"
    assert SpecConfig(controller="heuristic").controller == "heuristic"


def test_the_public_calls_take_typed_arguments_only() -> None:
    for function in (
        specdecode.load,
        SpecDecoder.load,
        SpecDecoder.generate,
        SpecDecoder.chat,
        SpecDecoder.stream,
    ):
        for parameter in inspect.signature(function).parameters.values():
            assert parameter.kind is not inspect.Parameter.VAR_KEYWORD, function
            assert parameter.name == "self" or parameter.annotation is not inspect.Parameter.empty
