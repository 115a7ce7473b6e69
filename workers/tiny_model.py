"""Build the embedded tiny model: a random-weight Qwen2 that the real vLLM engine loads.

Nothing can be downloaded at run time, so the demo and the tests use a model built here: a Qwen2
config (hidden size 128, 2 layers, 2 heads of size 64, 1 key/value head), random safetensors
weights, and a byte-level BPE tokenizer trained on Python's own standard-library sources, with
ChatML specials and a chat template. Its text is gibberish, but it is deterministic at
temperature 0 and runs vLLM's real loading, tokenizing, templating, sampling and batching code.
"""

from __future__ import annotations

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
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS_PACKAGES = ("email", "json", "http", "logging", "unittest", "asyncio")
MARKER = "fleet-tiny-model.json"


def ensure_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Build the tiny model in ``path`` unless a complete one is already there."""
    if (path / MARKER).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders never see a half-written model.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    try:
        build_tiny_model(staging, seed=seed)
        try:
            os.rename(staging, path)
        except OSError:
            if not (path / MARKER).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def build_tiny_model(out: Path, *, seed: int = 0) -> None:
    """Write config, tokenizer and random weights of the tiny model into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(out)
    _write_config(out, eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"])
    _write_weights(out, seed)
    (out / MARKER).write_text(json.dumps({"seed": seed, "vocab_size": VOCAB_SIZE}))


def _corpus() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in CORPUS_PACKAGES:
        for file in sorted((stdlib / package).glob("*.py")):
            yield file.read_text(encoding="utf-8", errors="replace")


def _write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    ids: dict[str, int] = {}
    for token in SPECIALS:
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
