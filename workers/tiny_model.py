"""Build the embedded tiny model: a random-weight Qwen2 that the real vLLM engine loads.

Nothing can be downloaded at run time, so the demo and the tests use a model built here: a Qwen2
config (hidden size 128, 2 layers, 2 heads of size 64, 1 key/value head), random safetensors
weights, and a byte-level BPE tokenizer trained on Python's own standard-library sources, with
ChatML specials and a chat template. Its text is gibberish, but it is deterministic at
temperature 0 and runs vLLM's real loading, tokenizing, templating, sampling and batching code.

The template renders tools, tool calls and tool results the Hermes/Qwen2.5 way (a ``<tools>``
list in the system turn, ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` from the
assistant, ``<tool_response>`` back), so vLLM's ``hermes`` tool parser reads its tool calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

VOCAB_SIZE = 2048
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 64  # vLLM's CPU attention refuses head size 16
MAX_POSITIONS = 2048
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Single tokens, as in Qwen2.5; not special, so decoding keeps them in the text for the parser.
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]
# Jinja with whitespace trimmed everywhere ({%- -%}); every newline of the output is an explicit
# '\n'. Without tools it renders plain ChatML.
CHAT_TEMPLATE = """
{%- if tools -%}
  {#- One system turn holds the caller's system text and the tool signatures. -#}
  {{- '<|im_start|>system\n' -}}
  {%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\n\n' -}}{%- endif -%}
  {{- '# Tools\n\nYou may call functions. Their signatures are inside <tools></tools>:\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\n</tools>\n\nTo call one, answer with its name and arguments inside <tool_call>' -}}
  {{- '</tool_call>:\n<tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call>' -}}
  {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if tools and loop.first and message['role'] == 'system' -%}
  {%- elif message['role'] == 'assistant' and message['tool_calls'] -%}
    {{- '<|im_start|>assistant\n' + (message['content'] or '') -}}
    {%- for call in message['tool_calls'] -%}
      {%- if message['content'] or not loop.first -%}{{- '\n' -}}{%- endif -%}
      {{- '<tool_call>\n{"name": ' + (call['function']['name'] | tojson) -}}
      {{- ', "arguments": ' + (call['function']['arguments'] | tojson) + '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif message['role'] == 'tool' -%}
    {{- '<|im_start|>user\n<tool_response>\n' + message['content'] -}}
    {{- '\n</tool_response><|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""
CORPUS_PACKAGES = ("email", "json", "http", "logging", "unittest", "asyncio")
MARKER = "fleet-tiny-model.json"
# Bump when the build changes: a tiny model built by an older version is rebuilt.
VERSION = 2


def ensure_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Build the tiny model in ``path`` unless a complete, current one is already there."""
    if _is_current(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders never see a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        build_tiny_model(staging, seed=seed)
        if path.exists() and not _is_current(path):
            # An older build: move it aside (atomically) so the rename below can take its place.
            with contextlib.suppress(OSError):
                os.rename(path, tempfile.mkdtemp(prefix=".tiny-old-", dir=path.parent) + "/m")
        try:
            os.rename(staging, path)
        except OSError:
            if not _is_current(path):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for old in path.parent.glob(".tiny-old-*"):
            shutil.rmtree(old, ignore_errors=True)
    return path


def _is_current(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return False


def build_tiny_model(out: Path, *, seed: int = 0) -> None:
    """Write config, tokenizer and random weights of the tiny model into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(out)
    _write_config(out, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
    _write_weights(out, seed)
    marker = {"seed": seed, "vocab_size": VOCAB_SIZE, "version": VERSION}
    (out / MARKER).write_text(json.dumps(marker))


def _corpus() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in CORPUS_PACKAGES:
        for file in sorted((stdlib / package).glob("*.py")):
            yield file.read_text(encoding="utf-8", errors="replace")


def _write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(TOOL_TOKENS),  # the tool tokens take the last ids
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    assert tokenizer.get_vocab_size() <= VOCAB_SIZE, tokenizer.get_vocab_size()
    tokenizer.save(str(out / "tokenizer.json"))
    ids: dict[str, int] = {}
    for token in [*SPECIALS, *TOOL_TOKENS]:
        token_id = tokenizer.token_to_id(token)
        assert token_id is not None, token
        ids[token] = token_id
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>"],
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return ids


def _write_config(out: Path, *, eos: int, pad: int) -> None:
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "torch_dtype": "float32",
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": eos}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def _write_weights(out: Path, seed: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    tensors = {"model.embed_tokens.weight": normal(VOCAB_SIZE, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
            p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
            p + "self_attn.q_proj.weight": normal(q, HIDDEN),
            p + "self_attn.q_proj.bias": normal(q),
            p + "self_attn.k_proj.weight": normal(kv, HIDDEN),
            p + "self_attn.k_proj.bias": normal(kv),
            p + "self_attn.v_proj.weight": normal(kv, HIDDEN),
            p + "self_attn.v_proj.bias": normal(kv),
            p + "self_attn.o_proj.weight": normal(HIDDEN, q),
            p + "mlp.gate_proj.weight": normal(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": normal(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": normal(HIDDEN, INTERMEDIATE),
        }
    tensors["model.norm.weight"] = np.ones(HIDDEN, np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
