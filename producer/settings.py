"""The one settings object of the fleet.

Every knob comes from environment variables prefixed ``FLEET_`` and, for per-model engine
settings, from a TOML fleet config file named by ``FLEET_CONFIG`` (environment wins over the
file). Build it once at an entry point with :func:`get_settings` and pass it down.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from producer.errors import ConfigError, UnknownModel
from producer.explain import segment
from producer.naming import check_model_id
from producer.schema import Priority, Sampling

TINY_MODEL_ID = "tiny"
#: How a ConfigError's message opens.
INVALID = "invalid fleet settings: "
ParserName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


ModelId = Annotated[str, AfterValidator(check_model_id)]


class StructuredOutputsOptions(BaseModel):
    """How the engine constrains JSON output (``vllm.config.StructuredOutputsConfig``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    backend: Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"] = "auto"
    """Grammar library; ``auto`` lets vLLM choose per request."""
    disable_any_whitespace: bool = False
    """Compact JSON only (no whitespace between tokens). Needs backend xgrammar or guidance."""

    @model_validator(mode="after")
    def _whitespace_needs_backend(self) -> StructuredOutputsOptions:
        # vLLM's own rule, checked here so a bad fleet config fails when it is read.
        if self.disable_any_whitespace and self.backend not in ("xgrammar", "guidance"):
            raise ValueError("disable_any_whitespace needs backend 'xgrammar' or 'guidance'")
        return self


class ModelConfig(BaseModel):
    """Engine settings of one model; names follow ``vllm.EngineArgs``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    served_model_name: list[ModelId] = Field(default_factory=list)
    """Other names the model answers to besides its id (vLLM's ``--served-model-name``); the
    gateway and ``/v1/models`` list them."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; defaults to ``model``."""
    engine: Literal["vllm", "openai", "fake"] = "vllm"
    """``vllm``: the engine resident in the worker. ``openai``: a remote engine, an
    OpenAI-compatible server (``vllm serve`` elsewhere) that the worker sends the model's
    requests to (``base_url``, ``api_key_env``, ``remote_model``, ``max_in_flight``,
    ``request_timeout_s``; the engine settings below are the server's business and are not
    used). ``fake``: the deterministic stand-in (queue benchmarks only)."""
    model: str | None = Field(default=None, validate_default=True)
    """Local directory or hub id of the weights (hub ids need the weights in the local cache).
    Required for engines ``vllm`` and ``fake``; not used by engine ``openai``."""
    base_url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/\S*)?$")] | None = None
    """Engine ``openai``: the server's API root, with its ``/v1`` (``http://gpu-box:8000/v1``)."""
    api_key_env: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = (
        None)
    """Engine ``openai``: the name of the environment variable holding the server's API key
    (sent as a bearer token); the key itself is never written in the config. None: no key."""
    remote_model: str | None = None
    """Engine ``openai``: the name the server serves the model under (the ``model`` of its
    requests, vLLM's ``--served-model-name``). None: the fleet's model id."""
    max_in_flight: int = Field(default=256, ge=1)
    """Engine ``openai``: most requests the worker has open against the server at once (the
    server's running batch is at most this); the rest wait in the worker, soonest priority
    first."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """Engine ``openai``: seconds one request may take at the server; then it fails with
    EngineFailed."""
    health_interval_s: float = Field(default=2.0, gt=0)
    """Engine ``openai``: seconds between two checks that the server answers and serves the
    model (``GET /models``); the worker consumes the model's queue only while it does."""
    max_model_len: int | None = Field(default=None, ge=-1)
    """Context length (prompt + output tokens); defaults to the model's own. -1: the longest
    that fits the KV cache vLLM can allocate (vLLM's auto-fit)."""
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    """Weights and activations dtype: auto, bfloat16, float16, float32."""
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    """GPUs one engine spans; defaults to the number of GPU ids the worker is pinned to."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    """Fraction of GPU memory (on CPU: of host memory) vLLM may take; vLLM's default if unset."""
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1)
    """KV-cache size in bytes; overrides gpu_memory_utilization when set."""
    enforce_eager: bool = False
    """Skip CUDA graphs / compilation (always wise on CPU)."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    """Most requests the engine runs at once (its max batch size)."""
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    """Most tokens one engine step schedules (prompt chunks and decodes together). None:
    ``vllm.LLM``'s default for the device (4,096 on CPU; 8,192-16,384 on GPUs), not the
    smaller one vLLM's OpenAI server picks for streaming latency."""
    hf_overrides: dict[str, Any] = Field(default_factory=dict)
    """Overrides applied to the model's Hugging Face config (e.g. rope_scaling)."""
    chat_template: str | None = None
    """Chat template replacing the model's own: a Jinja template, or the path of a file with one."""
    tool_call_parser: ParserName | None = None
    """vLLM tool parser for this model's tool calls, by its ``--tool-call-parser`` name
    (``hermes``, ``mistral``, ``llama3_json``, ``qwen3_coder``...). None: fallback forms only."""
    structured_outputs_config: StructuredOutputsOptions = Field(
        default_factory=StructuredOutputsOptions
    )
    """Engine settings of JSON-constrained generation (JSON results, forced tool calls)."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless you trust the model's source."""
    seed: int = 0
    """Engine seed, for requests that carry no seed of their own."""
    idle_unload_s: float | None = Field(default=None, gt=0)
    """Seconds with no request in flight and an empty model queue after which the worker
    releases the engine (see ``idle_mode``); the next request brings it back. None: never."""
    idle_mode: Literal["unload", "sleep"] = "unload"
    """How an idle engine is released. ``unload``: closed, every byte of memory freed, rebuilt
    on the next request (the only mode on CPU). ``sleep``: vLLM's sleep mode, level 1 (CUDA
    builds): the weights move to host memory and the KV cache is freed; waking takes seconds
    instead of a full load."""
    max_tokens_cap: int = Field(default=4096, ge=1)
    """Largest max_tokens a request may ask of this model."""
    defaults: Sampling = Field(default_factory=Sampling)
    """Sampling defaults of this model for the knobs a request leaves unset."""

    @property
    def weights(self) -> str:
        """``model``, which the config's check makes present for the engines that load it."""
        if self.model is None:
            raise ConfigError(f"{INVALID}model: an engine {self.engine!r} model has no weights")
        return self.model

    @field_validator("model")
    @classmethod
    def _weights_named(cls, value: str | None, info: ValidationInfo) -> str | None:
        engine = info.data.get("engine", "vllm")
        if not value and engine != "openai":
            raise ValueError(f"required for engine {engine!r} (the weights' directory or hub "
                             f"id)")
        return value

    @model_validator(mode="after")
    def _server_named(self) -> ModelConfig:
        if self.engine == "openai" and self.base_url is None:
            raise ValueError("base_url: required for engine 'openai' (the server's API root, "
                             "e.g. http://gpu-box:8000/v1)")
        return self

    @field_validator("max_model_len")
    @classmethod
    def _context_length(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 16:
            raise ValueError("at least 16 tokens, or -1 for the longest that fits in memory")
        return value


class FleetSettings(BaseSettings):
    """All settings of producers, workers and Flower."""

    model_config = SettingsConfigDict(
        env_prefix="FLEET_", extra="forbid", use_attribute_docstrings=True
    )

    broker_url: str = "redis://127.0.0.1:6379/0"
    """Redis URL of the broker (``redis://`` or ``rediss://``, with password if any)."""
    result_backend: str | None = None
    """Redis URL of the result backend; defaults to broker_url."""
    result_expires: int = Field(default=86_400, ge=60)
    """Seconds a result stays in the backend."""
    visibility_timeout: int = Field(default=120, ge=1)
    """Seconds before Redis hands a task held by a dead worker to another one. Live workers
    renew the lease on every task they hold (every visibility_timeout / 4), so a task may run
    longer than this; it bounds how long a killed worker's tasks wait. Every worker on one
    broker must use the same value."""
    max_deliveries: int = Field(default=3, ge=1)
    """Deliveries of one task before it is dead-lettered: a task that killed (or lost) its
    worker this many times fails with DeadLettered instead of looping forever."""
    max_message_bytes: int = Field(default=8 * 2**20, ge=1024)
    """Largest task message a producer sends (its JSON body); larger requests are refused."""
    stream_ttl_s: int = Field(default=300, ge=10)
    """Seconds a streaming task's Redis stream of text deltas lives after its last write."""
    stream_interval_s: float = Field(default=0.02, ge=0.0, le=1.0)
    """Least seconds between two writes of a worker's streams: the text generated meanwhile
    goes out together (vLLM's ``--stream-interval``, in time). The first text of an idle
    worker goes out at once. 0: every engine step's text as soon as it is made."""
    config: Path | None = None
    """TOML fleet config file with a ``[models.<id>]`` table per model."""
    models: dict[ModelId, ModelConfig] = Field(default_factory=dict)
    """Engine settings per model id (from the config file, or JSON in FLEET_MODELS)."""
    cache_dir: Path = Path.home() / ".cache" / "vllm-fleet"
    """Where the embedded tiny model is built."""
    worker_concurrency: int = Field(default=256, ge=1)
    """Tasks one worker holds at once: taken from its queues and not yet acknowledged. Its
    engine batches across all of them; the rest stay queued for the model's other workers."""
    task_events: bool = True
    """Workers send Celery task events (what Flower shows per task); three extra Redis writes
    per task."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of each worker's Prometheus ``/metrics`` (the fleet's ``fleet_*`` metrics and
    vLLM's own ``vllm:*``; 0: a free port, shown by ``fleet engines``). Unset: no metrics, and
    vLLM's stat logging stays off."""
    metrics_address: str = "127.0.0.1"
    """Address a worker's ``/metrics`` binds to (``0.0.0.0`` for a Prometheus elsewhere)."""
    engine_multiprocessing: bool = False
    """Run vLLM's engine core in a child process (VLLM_ENABLE_V1_MULTIPROCESSING). Off: the
    engine lives in the worker process, so it cannot outlive it."""
    signing_key: Path | None = None
    """PEM private key this process signs task and control messages with (Celery's auth
    serializer). Set it, signing_certificate and signing_cert_store on every producer, worker
    and Flower of the fleet, or on none."""
    signing_certificate: Path | None = None
    """PEM certificate of signing_key."""
    signing_cert_store: Path | None = None
    """Directory of the PEM certificates whose signatures are accepted."""
    flower_user: str | None = None
    """Flower basic-auth user."""
    flower_password: SecretStr | None = None
    """Flower basic-auth password."""
    flower_address: str = "127.0.0.1"
    """Address Flower binds to."""
    flower_port: int = 5555
    """Port Flower listens on."""

    gateway_address: str = "127.0.0.1"
    """Address the OpenAI-compatible gateway (``fleet gateway``) binds to."""
    gateway_port: int = 8000
    """Port the gateway listens on."""
    gateway_api_keys: dict[str, SecretStr] = Field(default_factory=dict)
    """Bearer keys the gateway accepts, by name (JSON: ``{"app-a": "sk-..."}``): one per
    application, so one can be replaced alone. Empty: the gateway starts only with
    ``--insecure``."""
    gateway_key_priorities: dict[str, Priority] = Field(default_factory=dict)
    """The priority of the requests sent with each key, by key name, where a request names none
    (JSON: ``{"evals": "batch"}``); a key not named here sends at ``default``."""
    gateway_files_dir: Path = Path(".fleet") / "gateway"
    """Where the gateway keeps the Batch API's files and batches (never in Redis); gateways
    that share it share the batches, each driven by one of them."""
    gateway_max_file_bytes: int = Field(default=200 * 2**20, gt=0)
    """Largest file the gateway accepts (``POST /v1/files``; OpenAI's limit: 200 MB)."""
    gateway_timeout_s: float = Field(default=600.0, gt=0)
    """Seconds the gateway waits for a task; then it answers 504 and revokes the task."""

    @model_validator(mode="after")
    def _key_priorities_name_keys(self) -> FleetSettings:
        for name in sorted(self.gateway_key_priorities.keys() - self.gateway_api_keys.keys()):
            raise ValueError(f"gateway_key_priorities: {name!r} is not a key of "
                             f"gateway_api_keys")
        return self

    @model_validator(mode="after")
    def _streams_outlive_redelivery(self) -> FleetSettings:
        # A redelivered streaming task is refused when its stream has begun; a stream that
        # expired before the redelivery would let a second run generate the text again.
        if self.stream_ttl_s <= self.visibility_timeout:
            raise ValueError(f"stream_ttl_s ({self.stream_ttl_s}) must be above "
                             f"visibility_timeout ({self.visibility_timeout})")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = os.environ.get("FLEET_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            # pydantic-settings skips a missing file, and the models in it would go unnoticed.
            if not Path(config_file).expanduser().is_file():
                raise ConfigError(f"{INVALID}{_config_file()}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @property
    def backend_url(self) -> str:
        return self.result_backend or self.broker_url

    def tiny_model_dir(self) -> Path:
        return self.cache_dir / "models" / TINY_MODEL_ID

    def all_models(self) -> dict[str, ModelConfig]:
        """Configured models, plus the embedded tiny model unless ``tiny`` is configured."""
        return {TINY_MODEL_ID: tiny_model_config(self.tiny_model_dir()), **self.models}

    def model(self, model_id: str) -> ModelConfig:
        try:
            return self.all_models()[model_id]
        except KeyError:
            raise UnknownModel(
                f"model {model_id!r} is not configured (known: {sorted(self.all_models())})"
            ) from None

    def resolve_model(self, name: str) -> str:
        """The id of the model that ``name`` (its id or one of its aliases) names."""
        try:
            return _model_names(self.models)[name]
        except KeyError:
            raise UnknownModel(
                f"model {name!r} is not configured (known: {sorted(self.all_models())})"
            ) from None

    @field_validator("models")
    @classmethod
    def _names_are_unique(cls, models: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        # Checked when the settings are read: a clash is a ConfigError naming both models, not
        # requests for one model quietly served by the other.
        _model_names(models)
        return models


def _model_names(models: dict[str, ModelConfig]) -> dict[str, str]:
    """Every name a model answers to (its id, its aliases) -> its id; ValueError on a clash."""
    names = {TINY_MODEL_ID: TINY_MODEL_ID} | {model_id: model_id for model_id in models}
    for model_id, config in models.items():
        for alias in config.served_model_name:
            owner = names.setdefault(alias, model_id)
            if owner != model_id:
                what = "the id" if alias == owner else "an alias"
                raise ValueError(f"served_model_name {alias!r} of model {model_id!r} is "
                                 f"already {what} of model {owner!r}")
    return names


def tiny_model_config(path: Path) -> ModelConfig:
    """Engine settings of the embedded tiny random-weight model (CPU friendly)."""
    return ModelConfig(
        model=str(path),
        max_model_len=512,
        dtype="bfloat16",
        enforce_eager=True,
        kv_cache_memory_bytes=256 * 2**20,
        max_num_seqs=1024,
        max_tokens_cap=512,
        tool_call_parser="hermes",
        # Random weights favour whitespace tokens: without this, constrained JSON never ends.
        structured_outputs_config=StructuredOutputsOptions(
            backend="xgrammar", disable_any_whitespace=True
        ),
    )


@functools.cache
def get_settings() -> FleetSettings:
    """The process-wide settings, read once from the environment and the config file.

    Invalid ones raise ConfigError (and are read again by the next call, which may find them
    fixed).
    """
    return read_settings()


def read_settings() -> FleetSettings:
    """The settings from the environment and the config file, or ConfigError: one line naming
    where each bad key comes from (the FLEET_CONFIG file or a FLEET_ variable) and the key."""
    try:
        return FleetSettings()
    except ValidationError as e:
        problems = [f"{_origin(error['loc'])}: {segment(FleetSettings, error)}"
                    for error in e.errors(include_url=False)]
    except SettingsError as e:  # a JSON variable (FLEET_MODELS) that does not parse
        field = re.search(r'field "(\w+)"', str(e))
        variable = f"FLEET_{field.group(1).upper()}" if field else "a FLEET_ variable"
        problems = [f"{variable}: not valid JSON: {e.__cause__ or e}"]
    except tomllib.TOMLDecodeError as e:
        problems = [f"{_config_file()}: not valid TOML: {e}"]
    except OSError as e:
        problems = [f"{_config_file()}: cannot read it: {e.strerror}"]
    raise ConfigError(INVALID + "; ".join(problems))


def _config_file() -> str:
    return f"{os.environ.get('FLEET_CONFIG')} (FLEET_CONFIG)"


def _origin(loc: Sequence[int | str]) -> str:
    """Where the value at ``loc`` was read: its FLEET_ variable or the config file, whichever
    holds more of ``loc`` (the variable on a tie: it wins over the file)."""
    if not loc:
        return "settings"
    variable = f"FLEET_{str(loc[0]).upper()}"
    value = {name.upper(): v for name, v in os.environ.items()}.get(variable)
    config = os.environ.get("FLEET_CONFIG")
    if config is None:
        return variable
    if value is None:
        return _config_file()
    try:
        in_variable: Any = {loc[0]: json.loads(value)} if len(loc) > 1 else {loc[0]: value}
    except ValueError:
        in_variable = {loc[0]: value}
    try:
        in_file: Any = tomllib.loads(Path(config).expanduser().read_text())
    except (OSError, ValueError):
        in_file = {}
    return variable if _depth(in_variable, loc) >= _depth(in_file, loc) else _config_file()


def _depth(data: Any, loc: Sequence[int | str]) -> int:
    """How many parts of ``loc`` lead through ``data`` (nested dicts)."""
    depth = 0
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            break
        data = data[part]
        depth += 1
    return depth
