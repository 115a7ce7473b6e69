"""``fleet batch run`` beside ``vllm run-batch``, its memory on a million lines, and a kill -9.

- Throughput: the same file of ``N`` chat lines x 32 tokens (``ignore_eos``) through ``fleet
  batch run`` with one resident worker of the tiny model, and through vLLM's own batch runner
  (``python -m vllm.entrypoints.launchers.run_batch``) with the same engine settings as the
  OpenAI server step. Each is also timed on a one-line file, and its rate is (N - 1) over the
  difference, which leaves out what a run pays once (vLLM loading its engine, the CLI's
  imports). Runs interleaved, each going first in turn.
- Memory: the CLI's peak RSS (psutil, polled every 50 ms) on ``MILLION`` lines through a
  fake-engine worker.
- Resume: ``KILL_LINES`` lines through the fake engine, the CLI killed with SIGKILL once about
  half are written, then run again; lines lost and custom_ids written twice are counted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from benchmarks import processes
from benchmarks.systems import openai_server
from benchmarks.workloads import prompts

N = int(os.environ.get("BENCH_BATCH_LINES", "10000"))
TOKENS = 32
MILLION = int(os.environ.get("BENCH_BATCH_MEMORY_LINES", "1000000"))
KILL_LINES = 100_000
WORK = Path(".fleet/bench/batch")


def write_input(path: Path, n: int, model: str, max_tokens: int) -> Path:
    texts = prompts(min(n, 20_000))
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({
                "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "max_tokens": max_tokens, "temperature": 0.0,
                         "ignore_eos": True,
                         "messages": [{"role": "user", "content": texts[i % len(texts)]}]}})
                    + "\n")
    return path


def fleet_cli(env: dict[str, str], source: Path, out: Path) -> subprocess.Popen[bytes]:
    out.unlink(missing_ok=True)
    return subprocess.Popen([sys.executable, "-m", "producer.cli", "batch", "run", str(source),
                             "-o", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def timed_fleet(env: dict[str, str], source: Path, out: Path) -> float:
    t0 = time.perf_counter()
    if fleet_cli(env, source, out).wait() != 0:
        raise RuntimeError("fleet batch run failed")
    return time.perf_counter() - t0


def run_batch_argv(source: Path, out: Path) -> list[str]:
    from producer.settings import get_settings

    cfg = get_settings().model("tiny")
    return [sys.executable, "-m", "vllm.entrypoints.launchers.run_batch", "-i", str(source),
            "-o", str(out), "--model", cfg.weights, "--served-model-name", "tiny",
            "--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len), "--enforce-eager",
            "--kv-cache-memory-bytes", str(cfg.kv_cache_memory_bytes),
            "--max-num-seqs", str(cfg.max_num_seqs), "--seed", str(cfg.seed),
            "--max-num-batched-tokens", str(openai_server.step_budget(cfg)),
            "--disable-log-stats"]


def timed_vllm(env: dict[str, str], source: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    log = (processes.LOGS / "vllm-run-batch.log").open("ab")
    if subprocess.Popen(run_batch_argv(source, out), env=env, stdout=log,
                        stderr=subprocess.STDOUT).wait() != 0:
        raise RuntimeError("vllm run-batch failed (see .fleet/bench/vllm-run-batch.log)")
    return time.perf_counter() - t0


def measure(env: dict[str, str], reps: int) -> dict[str, Any]:
    from producer.client import wait_for_engine

    WORK.mkdir(parents=True, exist_ok=True)
    processes.LOGS.mkdir(parents=True, exist_ok=True)
    big = write_input(WORK / "chat.jsonl", N, "tiny", TOKENS)
    one = write_input(WORK / "one.jsonl", 1, "tiny", TOKENS)
    out: dict[str, Any] = {"n": N, "max_tokens": TOKENS,
                           "fleet": {"n_s": [], "one_s": []}, "vllm": {"n_s": [], "one_s": []}}
    worker = processes.fleet_worker("tiny", "bench-batch", env)
    try:
        wait_for_engine("tiny", timeout=600)
        timed_fleet(env, write_input(WORK / "warm.jsonl", 256, "tiny", TOKENS),
                    WORK / "warm.out.jsonl")
        for rep in range(reps):
            for system in ("fleet", "vllm") if rep % 2 == 0 else ("vllm", "fleet"):
                run = timed_fleet if system == "fleet" else timed_vllm
                out[system]["n_s"].append(run(env, big, WORK / f"{system}.out.jsonl"))
                out[system]["one_s"].append(run(env, one, WORK / f"{system}.one.jsonl"))
                print(f"   {system}: {N} lines {out[system]['n_s'][-1]:.1f}s, one line "
                      f"{out[system]['one_s'][-1]:.1f}s", flush=True)
            lines = (WORK / "fleet.out.jsonl").read_text().splitlines()
            if len(lines) != N or any(json.loads(x)["response"]["status_code"] != 200
                                      for x in lines):
                raise AssertionError("fleet batch run: not every line succeeded")
    finally:
        processes.stop(worker)
    fake = processes.fleet_worker("fake", "bench-batch-fake", env)
    try:
        wait_for_engine("fake", timeout=120)
        out["memory"] = _peak_rss(env, write_input(WORK / "million.jsonl", MILLION, "fake", 4))
        print(f"   {MILLION} lines: peak RSS {out['memory']['peak_rss_bytes'] / 2**20:.0f} MB "
              f"in {out['memory']['wall_s']:.0f}s", flush=True)
        out["resume"] = _kill_and_resume(env, write_input(WORK / "kill.jsonl", KILL_LINES,
                                                          "fake", 4))
        print(f"   kill -9 at {out['resume']['written_at_kill']} of {KILL_LINES} lines, then "
              f"resumed: {out['resume']['lost']} lost, {out['resume']['twice']} twice",
              flush=True)
    finally:
        processes.stop(fake)
    return out


def _peak_rss(env: dict[str, str], source: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    cli = fleet_cli(env, source, WORK / "million.out.jsonl")
    proc = psutil.Process(cli.pid)
    peak = 0
    while cli.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    if cli.returncode != 0:
        raise RuntimeError("fleet batch run failed on the million lines")
    return {"lines": MILLION, "peak_rss_bytes": peak, "wall_s": time.perf_counter() - t0}


def _kill_and_resume(env: dict[str, str], source: Path) -> dict[str, Any]:
    result = WORK / "kill.out.jsonl"
    cli = fleet_cli(env, source, result)
    while cli.poll() is None and (not result.exists()
                                  or result.read_bytes().count(b"\n") < KILL_LINES // 2):
        time.sleep(0.05)
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    at_kill = result.read_bytes().count(b"\n")
    resumed = subprocess.run([sys.executable, "-m", "producer.cli", "batch", "run", str(source),
                              "-o", str(result)], env=env, capture_output=True)
    if resumed.returncode != 0:
        raise RuntimeError(resumed.stderr.decode()[-2000:])
    ids = Counter(json.loads(x)["custom_id"] for x in result.read_text().splitlines())
    return {"lines": KILL_LINES, "written_at_kill": at_kill,
            "lost": KILL_LINES - len(ids), "twice": sum(1 for c in ids.values() if c > 1)}
