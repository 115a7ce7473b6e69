"""The real engine: one resident ``vllm`` LLMEngine driven by a thread of its own.

All vLLM calls happen on that one thread. Task threads hand requests over through an inbox; the
thread adds them to the engine between steps (at most ``ADD_PER_STEP`` at a time, the soonest
priority first), so a request that arrives while others generate joins the running batch at the
next step (vLLM's continuous batching, with its priority scheduling). Each request is tokenized
and checked on its own before it joins: a bad one fails its own future, never the batch.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from copy import copy
from typing import Any

from producer.errors import EngineFailed, FleetError, InvalidRequest, PromptTooLong
from producer.schema import DEFAULT_MAX_TOKENS
from producer.settings import ModelConfig
from workers.engines import vllm_options
from workers.engines.base import EngineOutput, EngineRequest, EngineStats

log = logging.getLogger(__name__)


def check_sleep_mode() -> None:
    """``idle_mode = "sleep"`` needs vLLM's sleep mode, which only GPU platforms have."""
    from vllm.platforms import current_platform

    if not current_platform.is_sleep_mode_available():
        raise EngineFailed(
            f'idle_mode = "sleep" uses vLLM\'s sleep mode, which the '
            f'{current_platform.device_type} platform lacks: use idle_mode = "unload"')


def _engine_dead(error: Exception) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(error, EngineDeadError)


def _request_error(error: Exception) -> FleetError:
    """A fleet error stays as it is; anything else is vLLM refusing this one request."""
    if isinstance(error, FleetError):
        return error
    return InvalidRequest(f"{type(error).__name__}: {error}")


#: How long a stats call waits for the engine thread to count requests by priority (it counts
#: between two steps). Stats are asked for on the worker's consumer thread (remote control
#: replies, heartbeats), which must not stall behind a long step: past this wait the last
#: count stands, and the one asked for lands when the step ends.
PRIORITY_COUNT_WAIT_S = 0.1


def in_process_scheduler(engine: Any) -> Any:
    """The scheduler of an ``LLMEngine`` whose engine core runs in this process, else None."""
    core = getattr(engine.engine_core, "engine_core", None)
    return getattr(core, "scheduler", None)


#: At most this many requests join the engine between two of its steps, the soonest priority
#: first: a hand-over of thousands (a batch job's chunks) is added over several steps, so the
#: running batch goes on generating meanwhile and a request of a sooner priority that arrives
#: during it is added at the next step, ahead of the rest.
ADD_PER_STEP = 256


class _Inbox:
    """Requests handed to the engine and not yet added to it, kept per priority."""

    def __init__(self) -> None:
        self._queues: dict[int, deque[tuple[EngineRequest, Future[EngineOutput]]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def extend(self, items: Iterable[tuple[EngineRequest, Future[EngineOutput]]]) -> None:
        queues = self._queues
        for item in items:
            queue = queues.get(item[0].priority)
            if queue is None:
                queue = queues[item[0].priority] = deque()
            queue.append(item)
            self._count += 1

    def take(self, most: int) -> list[tuple[EngineRequest, Future[EngineOutput]]]:
        """Up to ``most`` requests, the soonest priority first, each priority in arrival order."""
        out: list[tuple[EngineRequest, Future[EngineOutput]]] = []
        for priority in sorted(self._queues):
            queue = self._queues[priority]
            while queue and len(out) < most:
                out.append(queue.popleft())
            if not queue:
                del self._queues[priority]
            if len(out) >= most:
                break
        self._count -= len(out)
        return out


class _Pending:
    """A request inside the engine: who waits for it, and how much of a streamed text has
    been handed out."""

    __slots__ = ("futures", "on_text", "priority", "prompt_tokens", "sent")

    def __init__(self, future: Future[EngineOutput], prompt_tokens: int,
                 on_text: Callable[[str], None] | None, priority: int) -> None:
        self.futures = [future]
        self.prompt_tokens = prompt_tokens
        self.on_text = on_text
        self.priority = priority
        self.sent = 0

    def stream(self, text: str) -> None:
        """Hand out what ``text`` (the whole text so far) adds to what was handed out."""
        if self.on_text is not None and len(text) > self.sent:
            delta, self.sent = text[self.sent:], len(text)
            try:
                self.on_text(delta)
            except Exception:  # a reader's trouble never stops the engine
                log.exception("streaming a delta failed")


class VLLMEngine:
    """A vLLM engine with continuous batching across callers."""

    def __init__(self, model_id: str, config: ModelConfig, *, tensor_parallel_size: int,
                 on_death: Callable[[BaseException], None] | None = None,
                 log_stats: bool = False) -> None:
        self.model_id = model_id
        #: Whether vLLM's stat logging runs (the vllm: metrics of the worker's /metrics). It
        #: also runs with the engine core in its own process (``_build``), where the
        #: scheduler's counts reach this process only through it.
        self.log_stats = log_stats
        self._log_stats_on = log_stats
        self.on_death = on_death
        self.config = config
        self.tensor_parallel_size = tensor_parallel_size
        self.max_model_len = 0
        self._cond = threading.Condition()
        self._inbox = _Inbox()
        self._aborts: list[str] = []
        # Calls that must run on the engine thread between steps (ping, sleep, wake up).
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._closing = False
        self._dead: BaseException | None = None
        self._core_dead: EngineFailed | None = None  # set by the engine-core watcher
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = EngineStats()
        self._by_priority_last: dict[int, list[int]] = {}
        self._engine: Any = None
        self._tokenizer: Any = None
        # Requests inside the engine, by request id.
        self._pending: dict[str, _Pending] = {}

    # --- the caller's side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"vllm-{self.model_id}")
        self._thread.start()
        self._loaded.wait()
        if self._dead is not None:
            raise EngineFailed(f"engine for {self.model_id!r} failed to load: {self._dead}")

    def submit(self, requests: Sequence[EngineRequest]) -> list[Future[EngineOutput]]:
        futures: list[Future[EngineOutput]] = [Future() for _ in requests]
        with self._cond:
            if self._dead is not None or self._closing:
                reason = self._dead or "engine is closing"
                for future in futures:
                    future.set_exception(EngineFailed(f"engine unavailable: {reason}"))
                return futures
            self._inbox.extend(zip(requests, futures, strict=True))
            self._cond.notify()
        return futures

    def abort(self, request_ids: Sequence[str]) -> None:
        with self._cond:
            self._aborts.extend(request_ids)
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            stats = copy(self._stats)
        stats.by_priority = self._by_priority()
        return stats

    def _by_priority(self) -> dict[int, list[int]]:
        """Requests inside the engine per priority, [running, waiting] as vLLM's scheduler
        holds them, counted on the engine thread between two steps. With the engine core in
        its own process the scheduler is out of reach: every request is counted as waiting
        until it finishes."""
        def count() -> dict[int, list[int]]:
            counts: dict[int, list[int]] = {}
            scheduler = in_process_scheduler(self._engine)
            for request in self._pending.values():
                counts.setdefault(request.priority, [0, 0])[1] += 1
            if scheduler is not None:
                for request in scheduler.running:
                    one = counts.setdefault(request.priority, [0, 0])
                    one[0] += 1
                    one[1] -= 1
            return {p: [r, max(w, 0)] for p, (r, w) in sorted(counts.items())}

        def keep(done: Future[dict[int, list[int]]]) -> None:
            if done.exception() is None:
                self._by_priority_last = done.result()

        try:
            counted = self._on_engine_thread(count)
        except EngineFailed:  # not loaded, or closing: nothing inside to count
            return {}
        counted.add_done_callback(keep)
        # Waits without raising: a count that failed (the engine stopped) leaves the last one.
        wait_for([counted], PRIORITY_COUNT_WAIT_S)
        return dict(self._by_priority_last)

    def ping(self, timeout: float) -> bool:
        """Answered by the engine thread between two engine steps: a dead or hung engine fails."""
        try:
            self._on_engine_thread(lambda: None).result(timeout)
        except Exception:  # not running, stopped meanwhile, or no answer in time
            return False
        return self._dead is None

    def sleep(self) -> None:
        """vLLM's sleep mode, level 1: weights to host memory, KV cache freed."""
        self._on_engine_thread(lambda: self._engine.sleep(level=1)).result()

    def wake_up(self) -> None:
        self._on_engine_thread(lambda: self._engine.wake_up()).result()

    def _on_engine_thread(self, call: Callable[[], Any]) -> Future[Any]:
        """Run ``call`` on the engine thread between two steps; its future holds the answer."""
        done: Future[Any] = Future()
        with self._cond:
            if self._dead is not None or self._closing or not self._loaded.is_set():
                raise EngineFailed(f"engine unavailable: {self._dead or 'not running'}")
            self._calls.append((call, done))
            self._cond.notify()
        return done

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # --- the engine thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._engine = self._build()
            self._tokenizer = self._engine.get_tokenizer()
            self.max_model_len = self._engine.model_config.max_model_len
        except BaseException as e:
            log.exception("engine for %s failed to load", self.model_id)
            self._dead = e
            self._loaded.set()
            return
        self._loaded.set()
        try:
            self._watch_core_processes()
            self._serve()
        except BaseException as e:
            log.exception("engine for %s died", self.model_id)
            self._dead = e
            if self.on_death is not None:
                try:
                    self.on_death(e)
                except Exception:
                    log.exception("engine death handler failed")
        finally:
            self._shutdown()

    def _build(self) -> Any:
        from vllm import EngineArgs, envs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        c = self.config
        optional: dict[str, Any] = {
            "dtype": c.dtype,
            "max_model_len": c.max_model_len,
        } | {
            k: v
            for k, v in {
                "gpu_memory_utilization": c.gpu_memory_utilization,
                "kv_cache_memory_bytes": c.kv_cache_memory_bytes,
                "max_num_seqs": c.max_num_seqs,
                "max_num_batched_tokens": c.max_num_batched_tokens,
            }.items()
            if v is not None
        }
        if c.idle_mode == "sleep":
            check_sleep_mode()
        self._log_stats_on = self.log_stats or envs.VLLM_ENABLE_V1_MULTIPROCESSING
        args = EngineArgs(
            model=c.weights,
            enable_sleep_mode=c.idle_mode == "sleep",
            tokenizer=c.tokenizer,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=c.enforce_eager,
            hf_overrides=dict(c.hf_overrides),
            trust_remote_code=c.trust_remote_code,
            seed=c.seed,
            # The scheduler's counts reach the fleet through a stat logger (and vLLM's own
            # Prometheus logger records the vllm: metrics); the model is named by its fleet id.
            disable_log_stats=not self._log_stats_on,
            served_model_name=[self.model_id],
            # Requests wait in the engine by their priority (lower first), then arrival.
            scheduling_policy="priority",
            **optional,
            **vllm_options.engine_kwargs(c),  # structured outputs; checks parser and template
        )
        # vllm.LLM's defaults, as the fleet serves batches: LLMEngine's own context leaves
        # the per-step token budget at 2,048 (half of LLM's on CPU), which needs about 1.5x
        # the engine steps of LLM.generate for the same batch (71 against 48 for 1,024 x 32).
        loggers = None
        if self._log_stats_on:
            from workers.engines.vllm_figures import figures_factory

            loggers = [figures_factory(self._scheduler_figures)]
        return LLMEngine.from_engine_args(args, usage_context=UsageContext.LLM_CLASS,
                                          stat_loggers=loggers)

    def _scheduler_figures(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        """After each engine step (on the engine thread), as vLLM's scheduler counted them."""
        with self._cond:
            stats = self._stats
            stats.running, stats.waiting, stats.kv_cache_usage = running, waiting, kv_cache_usage
            stats.max_running = max(stats.max_running, running)

    def _watch_core_processes(self) -> None:
        """With the engine core in processes of its own (``FLEET_ENGINE_MULTIPROCESSING``),
        see their death. vLLM's synchronous client only marks itself dead and closes its
        output thread without a word, so ``step()`` would wait forever and an idle engine
        would go on answering pings; here a death wakes the engine thread with the error."""
        core = self._engine.engine_core
        manager = getattr(getattr(core, "resources", None), "engine_manager", None)
        processes = list(getattr(manager, "processes", None) or [])
        if not processes:
            return  # in-process engine core: its failures raise from step() itself

        def watch() -> None:
            from multiprocessing.connection import wait

            wait([p.sentinel for p in processes])
            with self._cond:
                if self._closing:
                    return
                self._core_dead = EngineFailed("engine core process exited: " + ", ".join(
                    f"pid {p.pid}" + ("" if p.is_alive() else f" code {p.exitcode}")
                    for p in processes))
                self._cond.notify()
            core.outputs_queue.put_nowait(self._core_dead)  # a step waiting on it raises

        threading.Thread(target=watch, name="engine-core-watch", daemon=True).start()

    def _serve(self) -> None:
        pending = self._pending
        # Without stat logging, the scheduler's counts are read from the in-process engine core
        # after each step (two list lengths); with it, a stat logger receives them.
        scheduler = None if self._log_stats_on else in_process_scheduler(self._engine)
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._calls or pending
                           or self._closing or self._core_dead):
                    self._cond.wait()
                if self._core_dead is not None:
                    raise self._core_dead
                inbox = self._inbox.take(ADD_PER_STEP)
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
                closing = self._closing
            for call, done in calls:
                try:
                    done.set_result(call())
                except Exception as e:
                    done.set_exception(e)
            if inbox:
                self._add_all(inbox, pending)
            if aborts:
                self._abort(aborts, pending)
            if not pending:
                if closing:
                    return
                continue
            outputs = self._engine.step()
            finished = [out for out in outputs if out.finished]
            with self._cond:
                stats = self._stats
                stats.requests_served += len(finished)
                stats.tokens_generated += sum(len(o.outputs[0].token_ids) for o in finished)
                if scheduler is not None:
                    running, stats.waiting = scheduler.get_request_counts()
                    stats.running, stats.kv_cache_usage = running, scheduler.get_kv_cache_usage()
                    stats.max_running = max(stats.max_running, running)
                if len(finished) == len(pending):  # a stat logger's last count was before them
                    stats.running = stats.waiting = 0
            for out in outputs:
                if not out.finished:  # only streaming requests report before they finish
                    streaming = pending.get(out.request_id)
                    if streaming is not None:
                        streaming.stream(out.outputs[0].text)
                    continue
                request = pending.pop(out.request_id)
                completion = out.outputs[0]
                request.stream(completion.text)
                result = EngineOutput(
                    text=completion.text,
                    finish_reason=completion.finish_reason or "stop",
                    prompt_tokens=request.prompt_tokens,
                    completion_tokens=len(completion.token_ids),
                    logprobs=vllm_options.token_logprobs(completion),
                )
                for future in request.futures:
                    future.set_result(result)

    def _add_all(
        self,
        inbox: list[tuple[EngineRequest, Future[EngineOutput]]],
        pending: dict[str, _Pending],
    ) -> None:
        """Tokenize what arrived in one batch call (the fast tokenizer's batch path costs a
        fraction of one call per prompt), then add each request on its own."""
        texts: list[tuple[EngineRequest, Future[EngineOutput], str, bool]] = []
        for request, future in inbox:
            try:
                texts.append((request, future, *self._text(request)))
            except Exception as e:
                future.set_exception(_request_error(e))
        try:
            ids_of: list[list[int] | Exception] = list(
                self._encode([(text, special) for _, _, text, special in texts]))
        except Exception:  # a text the tokenizer refuses fails alone: one call each
            ids_of = [self._encode_alone(text, special) for _, _, text, special in texts]
        for (request, future, _, _), ids in zip(texts, ids_of, strict=True):
            if isinstance(ids, Exception):
                future.set_exception(_request_error(ids))
            else:
                self._add(request, future, ids, pending)

    def _add(
        self,
        request: EngineRequest,
        future: Future[EngineOutput],
        ids: list[int],
        pending: dict[str, _Pending],
    ) -> None:
        if request.request_id in pending:  # a redelivered copy of a request still running
            pending[request.request_id].futures.append(future)
            return
        try:
            self._check_length(ids)
            params = self._sampling_params(request.sampling, len(ids),
                                           streaming=request.on_text is not None)
            self._engine.add_request(request.request_id, {"prompt_token_ids": ids}, params,
                                     priority=request.priority)
        except Exception as e:  # ours, or vLLM's own validation of this one request
            if _engine_dead(e):  # not this request's fault: the engine is gone
                with self._cond:  # failed after the death is reported, so it is requeued
                    self._core_dead = self._core_dead or EngineFailed(f"engine died: {e!r}")
                    self._inbox.extend([(request, future)])
                return
            future.set_exception(_request_error(e))
        else:
            pending[request.request_id] = _Pending(future, len(ids), request.on_text,
                                                   request.priority)

    def _text(self, request: EngineRequest) -> tuple[str, bool]:
        """What to tokenize, and whether the tokenizer adds its special tokens to it."""
        if request.messages is not None:
            # The chat template (with tools) already wrote the special tokens.
            return vllm_options.render_chat(self._tokenizer, request, self.config), False
        return request.prompt or "", True

    def _encode(self, texts: list[tuple[str, bool]]) -> list[list[int]]:
        ids: list[list[int]] = [[] for _ in texts]
        for special in (True, False):
            where = [i for i, (_, s) in enumerate(texts) if s is special]
            if where:
                encoded = self._tokenizer([texts[i][0] for i in where],
                                          add_special_tokens=special)["input_ids"]
                for i, one in zip(where, encoded, strict=True):
                    ids[i] = list(one)
        return ids

    def _encode_alone(self, text: str, special: bool) -> list[int] | Exception:
        try:
            return self._encode([(text, special)])[0]
        except Exception as e:
            return e

    def _check_length(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequest("prompt: empty after tokenization")
        if len(ids) >= self.max_model_len:
            raise PromptTooLong(
                f"prompt: {len(ids)} tokens, but model {self.model_id!r} takes at most "
                f"{self.max_model_len - 1} prompt tokens (max_model_len {self.max_model_len})"
            )

    def _sampling_params(self, sampling: dict[str, Any], prompt_tokens: int, *,
                         streaming: bool = False) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs = vllm_options.sampling_kwargs(sampling)
        # Generation stops at the context's end anyway; saying so keeps finish_reason honest.
        room = self.max_model_len - prompt_tokens
        kwargs["max_tokens"] = min(int(kwargs.get("max_tokens", DEFAULT_MAX_TOKENS)), room)
        # A streaming request reports its whole text so far after every step (vLLM holds back
        # what could still turn into a stop string), so each delta is what the text added.
        kind = RequestOutputKind.CUMULATIVE if streaming else RequestOutputKind.FINAL_ONLY
        return SamplingParams(**kwargs, output_kind=kind)

    def _abort(self, request_ids: list[str], pending: dict[str, _Pending]) -> None:
        ids = [i for i in request_ids if i in pending]
        if not ids:
            return
        self._engine.abort_request(ids)
        aborted = [pending.pop(request_id) for request_id in ids]
        with self._cond:
            self._stats.running = len(pending)  # before the callers hear; no step may follow
        for request in aborted:
            for future in request.futures:
                future.set_result(EngineOutput("", "abort", request.prompt_tokens, 0))

    def _shutdown(self) -> None:
        with self._cond:
            self._closing = True
            leftovers = self._inbox.take(len(self._inbox))
            calls, self._calls = self._calls, []
        for _, done in calls:
            done.set_exception(EngineFailed("engine stopped"))
        reason = f"engine died: {self._dead!r}" if self._dead else "engine stopped"
        for _, future in leftovers:
            future.set_exception(EngineFailed(f"{reason} before serving the request"))
        for request in self._pending.values():
            for future in request.futures:
                future.set_exception(EngineFailed(f"{reason} while serving the request"))
        self._pending.clear()
        engine, self._engine = self._engine, None
        if engine is not None:
            try:
                engine.engine_core.shutdown()
            except Exception:
                log.exception("engine core shutdown failed")
        del engine
        gc.collect()
