"""Per-model engine options and per-call vLLM extras, as the vLLM engine builds them.

Unit level, without starting an engine: the engine's own ``_build`` runs with vLLM's
``LLMEngine.from_engine_args`` replaced by a recorder, and the recorded ``EngineArgs`` build the
real vLLM model config from the tiny model's files (what the engine would load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from producer.schema import DEFAULT_MAX_TOKENS, ChatRequest, Sampling
from producer.settings import ModelConfig, StructuredOutputsOptions
from tests.required import require_module
from workers.engines import vllm_options
from workers.engines.base import EngineRequest
from workers.engines.vllm import VLLMEngine

require_module("vllm")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def _engine_args(config: ModelConfig, monkeypatch: pytest.MonkeyPatch,
                 calls: list[dict[str, Any]] | None = None) -> Any:
    from vllm.v1.engine.llm_engine import LLMEngine

    seen: list[Any] = []

    def record(cls: Any, args: Any, *a: Any, **k: Any) -> None:
        seen.append(args)
        if calls is not None:
            calls.append(k)

    monkeypatch.setattr(LLMEngine, "from_engine_args", classmethod(record))
    VLLMEngine("m", config, tensor_parallel_size=1)._build()
    return seen[0]


def test_the_engine_takes_vllm_llm_batch_defaults(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built as vllm.LLM builds its engine (per-step token budget of the offline class, not
    LLMEngine's smaller fallback); a configured budget wins."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    calls: list[dict[str, Any]] = []
    args = _engine_args(ModelConfig(model=str(tiny), enforce_eager=True), monkeypatch, calls)
    context = calls[0]["usage_context"]
    assert context == UsageContext.LLM_CLASS
    budget = args.create_engine_config(context).scheduler_config.max_num_batched_tokens
    llm_default = EngineArgs(model=str(tiny)).get_batch_defaults(1)[0][UsageContext.LLM_CLASS]
    assert budget == llm_default
    set_args = _engine_args(ModelConfig(model=str(tiny), enforce_eager=True,
                                        max_num_batched_tokens=8192), monkeypatch)
    assert set_args.max_num_batched_tokens == 8192


def test_idle_sleep_mode_reaches_the_engine_where_vllm_has_it_and_is_refused_on_cpu(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.platforms import current_platform

    from producer.errors import EngineFailed

    assert _engine_args(ModelConfig(model=str(tiny)), monkeypatch).enable_sleep_mode is False
    sleepy = ModelConfig(model=str(tiny), idle_mode="sleep")
    with pytest.raises(EngineFailed, match='cpu platform lacks: use idle_mode = "unload"'):
        _engine_args(sleepy, monkeypatch)
    monkeypatch.setattr(type(current_platform), "is_sleep_mode_available", lambda self: True)
    assert _engine_args(sleepy, monkeypatch).enable_sleep_mode is True


def test_max_model_len_minus_one_lets_vllm_fit_the_context(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _engine_args(ModelConfig(model=str(tiny), max_model_len=-1), monkeypatch)
    assert args.max_model_len == -1
    with pytest.raises(ValueError, match="-1 for the longest"):
        ModelConfig(model=str(tiny), max_model_len=0)


def test_hf_overrides_change_the_engine_model_config(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = _engine_args(ModelConfig(model=str(tiny)), monkeypatch).create_model_config()
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    config = ModelConfig(model=str(tiny), hf_overrides={"rope_scaling": rope,
                                                        "max_position_embeddings": 8192})
    scaled = _engine_args(config, monkeypatch).create_model_config()
    assert plain.hf_config.rope_parameters["rope_type"] == "default"
    assert plain.max_model_len == 2048
    assert scaled.hf_config.rope_parameters["rope_type"] == "yarn"
    assert scaled.hf_config.rope_parameters["factor"] == 4.0
    assert scaled.max_model_len == 8192  # derived from the overridden config


def test_structured_outputs_settings_reach_the_engine(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = StructuredOutputsOptions(backend="xgrammar", disable_any_whitespace=True)
    args = _engine_args(ModelConfig(model=str(tiny), structured_outputs_config=options),
                        monkeypatch)
    assert args.structured_outputs_config.backend == "xgrammar"
    assert args.structured_outputs_config.disable_any_whitespace is True
    with pytest.raises(ValueError, match="disable_any_whitespace"):
        StructuredOutputsOptions(disable_any_whitespace=True)  # vLLM's rule, at config time


def test_an_unknown_tool_parser_fails_the_engine_build_naming_it(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"tool_call_parser: .*'hermes3000'.*hermes"):
        _engine_args(ModelConfig(model=str(tiny), tool_call_parser="hermes3000"), monkeypatch)
    for name in ("hermes", "mistral", "llama3_json", "llama4_json", "deepseek_v3",
                 "qwen3_coder"):
        vllm_options.engine_kwargs(ModelConfig(model=str(tiny), tool_call_parser=name))


def test_chat_template_override_inline_or_file(tiny: Path, tmp_path: Path) -> None:
    from vllm.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(str(tiny))
    messages = [{"role": "user", "content": "hi"}]
    request = EngineRequest("r", {}, messages=messages)
    own = vllm_options.render_chat(tokenizer, request, ModelConfig(model=str(tiny)))
    assert own == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    config = ModelConfig(model=str(tiny), chat_template=inline)
    assert vllm_options.render_chat(tokenizer, request, config) == "[user] hi"
    file = tmp_path / "template.jinja"
    file.write_text("{{ messages | length }} message(s)")
    config = ModelConfig(model=str(tiny), chat_template=str(file))
    assert vllm_options.render_chat(tokenizer, request, config) == "1 message(s)"


def test_tools_and_tool_calls_go_through_the_tiny_models_template(tiny: Path) -> None:
    from vllm.tokenizers import get_tokenizer

    tool = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}}
    chat = ChatRequest.model_validate({"model": "m", "tools": [tool], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "time?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_time", "arguments": '{"tz": "UTC"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
    ]})
    request = EngineRequest("r", {}, messages=[m.model_dump() for m in chat.messages],
                            tools=[tool])
    text = vllm_options.render_chat(get_tokenizer(str(tiny)), request,
                                    ModelConfig(model=str(tiny)))
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert '{"type": "function", "function": {"name": "get_time"' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_time", "arguments": '
            '{"tz": "UTC"}}\n</tool_call><|im_end|>') in text
    assert "<tool_response>\n12:00\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_only_the_wires_sampling_fields_reach_sampling_params() -> None:
    from vllm import SamplingParams

    wire = Sampling.model_validate({
        "min_tokens": 2, "max_tokens": 8, "logprobs": 3, "ignore_eos": True, "min_p": 0.1,
        "logit_bias": {"17": 5.0}, "stop_token_ids": [3], "bad_words": ["spam"],
        "temperature": 0.5, "stop": ["\n"],
    }).model_dump(exclude_none=True)
    sampling = {**wire, "structured_outputs": {"json": {"type": "object"}},
                "not_allowed": 1, "n": 4}
    kwargs = vllm_options.sampling_kwargs(sampling)
    assert set(kwargs) == {"min_tokens", "max_tokens", "logprobs", "ignore_eos", "min_p",
                           "logit_bias", "stop_token_ids", "bad_words", "temperature", "stop",
                           "structured_outputs"}
    assert kwargs["logit_bias"] == {17: 5.0}
    params = SamplingParams(**kwargs)
    assert params.structured_outputs is not None
    assert params.structured_outputs.json == {"type": "object"}
    assert (params.min_tokens, params.max_tokens, params.temperature) == (2, 8, 0.5)
    # Every wire field is a SamplingParams field of the same name, and the default agrees.
    assert set(Sampling.model_fields) <= set(SamplingParams.__struct_fields__)
    assert SamplingParams().max_tokens == DEFAULT_MAX_TOKENS


def test_the_example_fleet_configs_parsers_are_vllms() -> None:
    import tomllib

    from workers.toolcalls import check_parser

    example = Path(__file__).parent.parent / "compose" / "fleet.example.toml"
    models = tomllib.loads(example.read_text())["models"]
    parsers = {m["tool_call_parser"] for m in models.values() if "tool_call_parser" in m}
    assert parsers
    for name in parsers:
        check_parser(name)
