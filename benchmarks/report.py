"""Turn raw benchmark timings into figures, ratios, a table, a JSON file and a PNG chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

from benchmarks.workloads import workloads

RESULTS = Path(__file__).parent / "results"
MB = 2**20


def machine() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "processor": platform.processor() or platform.machine(),
            **_cpu_model(), "python": platform.python_version()}


def _cpu_model() -> dict[str, Any]:
    """The CPU's name and the vector units vLLM's CPU kernels use: the engine runs several
    times faster with AMX (or AVX-512 bf16) than with AVX2 only, so figures of different
    machines compare only as ratios measured within one run."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    units = [u for u in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if u in flags]
    return {"cpu_model": name, "vector_units": units}


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Requests per second per system and workload, and their ratios to the direct engine,
    the OpenAI server and naive Celery."""
    med = statistics.median
    n = {w.name: len(w.prompts) for w in workloads()}
    rps: dict[str, dict[str, float]] = {}

    def add(system: str, name: str, times: list[float], count: int | None = None) -> None:
        rps.setdefault(system, {})[name] = (count or n[name]) / med(times)

    for name, times in raw.get("direct", {}).get("times", {}).items():
        add("direct engine", name, times)
    for path in ("batch", "delay"):
        for name, times in raw.get("fleet", {}).get(path, {}).items():
            add(f"fleet ({'batch helper' if path == 'batch' else '.delay()'})", name, times)
    for name, best in raw.get("openai", {}).items():
        add("vLLM OpenAI server", name, best["times"])
    if "naive" in raw:
        add("naive Celery", "1024x32", raw["naive"]["times"], raw["naive"]["n"])
    ratios: dict[str, float] = {}
    direct = rps.get("direct engine", {})
    for system in ("fleet (batch helper)", "fleet (.delay())"):
        for name, value in rps.get(system, {}).items():
            if name in direct:
                ratios[f"{system} / direct, {name}"] = value / direct[name]
            if name in rps.get("vLLM OpenAI server", {}):
                ratios[f"{system} / OpenAI server, {name}"] = value / rps[
                    "vLLM OpenAI server"][name]
            if name in rps.get("naive Celery", {}):
                ratios[f"{system} / naive Celery, {name}"] = value / rps["naive Celery"][name]
    out: dict[str, Any] = {"requests_per_s": rps, "ratios": ratios}
    if "overhead" in raw:
        from benchmarks.systems.overhead import rounds

        o = raw["overhead"]
        fleet_ms, stock_ms = rounds(o["latency_ms"]), rounds(o["stock"]["latency_ms"])
        batch_tps = o["batch_helper_n"] / med(o["batch_helper_s"])
        stock_tps = o["stock"]["delay_n"] / med(o["stock"]["delay_s"])
        cpu_us = 1e6 * med(o["delay_cpu_s"]) / o["delay_n"]
        stock_cpu_us = 1e6 * med(o["stock"]["delay_cpu_s"]) / o["stock"]["delay_n"]
        out["overhead"] = {
            "fake batch helper tasks/s": batch_tps,
            "fake .delay() tasks/s": o["delay_n"] / med(o["delay_s"]),
            "stock Celery no-op tasks/s": stock_tps,
            "fake batch helper / stock no-op": batch_tps / stock_tps,
            "fake worker CPU per .delay() task us": cpu_us,
            "stock worker CPU per no-op task us": stock_cpu_us,
            "fake / stock worker CPU per task": cpu_us / stock_cpu_us,
            **_producer_cpu(o),
            "fake latency p50 ms": fleet_ms["p50"],
            "fake latency p99 ms": fleet_ms["p99"],
            "stock no-op latency p50 ms": stock_ms["p50"],
            "stock no-op latency p99 ms": stock_ms["p99"],
            "fake worker RSS MB": o["worker_rss_bytes"] / MB,
        }
    if "gateway" in raw:
        out["gateway"] = gateway(raw["gateway"])
    if "metrics" in raw:
        out["metrics"] = metrics(raw["metrics"])
    if "priority" in raw:
        out["priority"] = priority(raw["priority"])
    if "batch" in raw:
        out["batch"] = batch_file(raw["batch"])
    if "remote" in raw:
        out["remote"] = remote(raw["remote"])
    if "fleet" in raw and "direct" in raw:
        out["paired"] = _paired(raw["direct"]["times"], raw["fleet"])
        for name, cpu in raw["fleet"].get("delay_cpu_s", {}).items():
            out["paired"][f"fleet worker CPU per .delay() task, engine included, {name} ms"] = (
                1e3 * med(cpu) / n[name])
        out["cpu"] = _cpu_budget(raw, n)
        if raw["fleet"].get("single_ms"):
            single = raw["fleet"]["single_ms"]
            direct_p50, fleet_p50 = med(single["direct"]), med(single["fleet"])
            out["latency"] = {
                "single 32-token request, direct p50 ms": direct_p50,
                "single 32-token request, fleet .delay().get() p50 ms": fleet_p50,
                "latency the fleet adds, p50 ms": fleet_p50 - direct_p50,
            }
        out["memory"] = {
            "fleet worker RSS MB": raw["fleet"]["rss_bytes"] / MB,
            "direct engine process RSS MB": raw["direct"]["rss_bytes"] / MB,
            "worker beyond the engine MB": (raw["fleet"]["rss_bytes"]
                                            - raw["direct"]["rss_bytes"]) / MB,
        }
    return out


GATEWAY_SYSTEMS = {"gateway": "gateway + fleet", "server": "vLLM server"}
CPU_LABELS = {"gateway": "gateway", "worker": "fleet worker", "server": "vLLM server"}


def gateway(raw: dict[str, Any]) -> dict[str, float]:
    """The fleet behind its OpenAI gateway beside vLLM's OpenAI server, on chat: throughput at
    each one's best concurrency and the CPU it cost, time to first token, one stream's token
    rate, and how soon a client's disconnect frees the fleet's engine."""
    med = statistics.median
    t = raw["throughput"]
    name = f"{t['n']}x{t['max_tokens']} chat"
    out: dict[str, float] = {}
    best = best_concurrency(t)
    for system, label in GATEWAY_SYSTEMS.items():
        concurrency, runs = best[system]
        out[f"{name}, {label} wall s"] = med(runs["times"])
        out[f"{name}, {label} at concurrency"] = concurrency
        for process, cpu in runs["cpu_s"].items():
            out[f"{name}, {CPU_LABELS[process]} CPU per request ms"] = 1e3 * med(cpu) / t["n"]
    out[f"{name}, gateway / server throughput"] = (
        med(best["server"][1]["times"]) / med(best["gateway"][1]["times"]))
    for system, label in GATEWAY_SYSTEMS.items():
        ms = raw["first_token_ms"][system]
        deciles = statistics.quantiles(ms, n=10, method="inclusive")
        out[f"first token, {label} p50 ms"] = med(ms)
        out[f"first token, {label} p10 ms"] = deciles[0]
        out[f"first token, {label} p90 ms"] = deciles[-1]
    out["first token p50, gateway - server ms"] = (
        med(raw["first_token_ms"]["gateway"]) - med(raw["first_token_ms"]["server"]))
    for system, label in GATEWAY_SYSTEMS.items():
        out[f"one stream, {label} tokens/s"] = med(raw["tokens_per_s"][system])
    out["one stream, gateway / server tokens/s"] = (
        med(raw["tokens_per_s"]["gateway"]) / med(raw["tokens_per_s"]["server"]))
    disconnect = raw["disconnect"]
    out["client disconnect to worker in_flight 0, median ms"] = med(disconnect["ms"])
    out["client disconnects that aborted the engine's request %"] = (
        100 * sum(disconnect["aborted"]) / len(disconnect["aborted"]))
    return out


def metrics(raw: dict[str, Any]) -> dict[str, float]:
    """A worker's CPU per task with its metrics on (and scraped) and off, runs interleaved:
    the medians and the on/off ratio of each interleaved pair (median, lowest, highest)."""
    med = statistics.median
    name = f"{raw['n']}x{raw['max_tokens']} .delay()"
    on, off = raw["on"], raw["off"]
    out: dict[str, float] = {}
    for side, runs in (("on", on), ("off", off)):
        out[f"{name}, worker CPU per task, metrics {side} ms"] = 1e3 * med(runs["cpu_s"]) / raw["n"]
        out[f"{name}, wall, metrics {side} s"] = med(runs["times"])
    pairs = [a / b for a, b in zip(on["cpu_s"], off["cpu_s"], strict=True)]
    out[f"{name}, worker CPU on / off, paired median"] = med(pairs)
    out[f"{name}, worker CPU on / off, paired lowest"] = min(pairs)
    out[f"{name}, worker CPU on / off, paired highest"] = max(pairs)
    out[f"{name}, wall on / off, paired median"] = med(
        a / b for a, b in zip(on["times"], off["times"], strict=True))
    return out


def best_concurrency(throughput: dict[str, Any]) -> dict[str, tuple[int, dict[str, Any]]]:
    """Per system, the concurrency whose median wall time is lowest, and its runs."""
    med = statistics.median
    return {system: min(((int(c), runs) for c, runs in throughput[system].items()),
                        key=lambda item: med(item[1]["times"]))
            for system in GATEWAY_SYSTEMS}


def _producer_cpu(o: dict[str, Any]) -> dict[str, float]:
    """The producer's CPU per task (``.delay()`` and collecting the result), the fleet's task
    beside stock Celery's no-op: what an application pays per call, on any engine."""
    if not o.get("producer_cpu_s"):
        return {}
    fleet = 1e6 * statistics.median(o["producer_cpu_s"]) / o["delay_n"]
    stock = 1e6 * statistics.median(o["stock"]["producer_cpu_s"]) / o["stock"]["delay_n"]
    return {"producer CPU per fleet .delay() task us": fleet,
            "producer CPU per stock Celery .delay() task us": stock}


def _cpu_budget(raw: dict[str, Any], n: dict[str, int]) -> dict[str, float]:
    """Where two cores' time goes in a ``.delay()`` run, per request: the producer sending and
    collecting, Redis, the worker (engine included), beside the direct engine's own CPU.

    The fleet's wall time cannot be below its processes' CPU seconds over the cores, so
    ``direct wall x cores / fleet CPU`` is the highest ``.delay()`` / direct ratio that the CPU
    the run used allows, whatever the order in which that work is done.
    """
    med = statistics.median
    fleet, direct = raw["fleet"], raw["direct"]
    out: dict[str, float] = {}
    cores = raw.get("machine", {}).get("cpus") or os.cpu_count() or 1
    for name in fleet.get("delay_producer_cpu_s", {}):
        per = {who: 1e3 * med(fleet[key][name]) / n[name] for who, key in (
            ("producer", "delay_producer_cpu_s"), ("worker", "delay_cpu_s"),
            ("redis", "delay_redis_cpu_s"))}
        engine = 1e3 * med(direct["cpu_s"][name]) / n[name] if name in direct.get("cpu_s", {}) \
            else float("nan")
        total = sum(per.values())
        out[f"direct engine CPU per request, {name} ms"] = engine
        for who, ms in per.items():
            out[f".delay() {who} CPU per request, {name} ms"] = ms
        out[f".delay() CPU beyond the direct engine's, {name} ms"] = total - engine
        out[f".delay() / direct ceiling from the CPU used, {name}"] = (
            med(direct["times"][name]) * cores / (total * n[name] / 1e3))
    return out


def _paired(direct: dict[str, list[float]], fleet: dict[str, Any]) -> dict[str, float]:
    """Fleet / direct per interleaved repetition (each pair met the same noise): the median
    and the lowest and highest pair, so a reader sees how far the machine's noise reaches."""
    out: dict[str, float] = {}
    for path, label in (("batch", "batch helper"), ("delay", ".delay()")):
        for name, times in fleet.get(path, {}).items():
            pairs = [d / f for d, f in zip(direct.get(name, []), times, strict=False)]
            if pairs:
                key = f"fleet ({label}) / direct, {name}, paired"
                out[f"{key} median"] = statistics.median(pairs)
                out[f"{key} lowest"] = min(pairs)
                out[f"{key} highest"] = max(pairs)
    return out


def priority(raw: dict[str, Any]) -> dict[str, float]:
    """Per engine setting: the interactive caller's latency on the idle worker and under the
    bulk job, priorities on and off (p50 and p99 over every run's requests, and as multiples
    of the idle p50), and the bulk job's throughput with the caller over alone, as the median
    of each repetition's pair (and their lowest and highest)."""
    med = statistics.median
    out: dict[str, float] = {}
    for model, runs in raw.items():
        if not isinstance(runs, dict):
            continue
        name = f"{model} (max_num_seqs {runs['max_num_seqs']})"
        idle = med(runs["idle_ms"])
        out[f"{name}: interactive p50 on an idle worker ms"] = idle
        alone = [run["wall_s"] for run in runs["alone"]]
        out[f"{name}: bulk job alone, requests/s"] = raw["bulk"] / med(alone)
        out[f"{name}: bulk job alone, worker CPU per request ms"] = 1e3 * med(
            run["cpu_s"] for run in runs["alone"]) / raw["bulk"]
        for kind, label in (("on", "priorities on"), ("off", "priorities off")):
            ms = [x for run in runs[kind] for x in run["interactive_ms"]]
            p50, p99 = med(ms), _percentile(ms, 99)
            out[f"{name}, {label}: interactive p50 ms"] = p50
            out[f"{name}, {label}: interactive p99 ms"] = p99
            out[f"{name}, {label}: interactive p50 / idle p50"] = p50 / idle
            out[f"{name}, {label}: interactive p99 / idle p50"] = p99 / idle
            pairs = [a / run["wall_s"] for a, run in zip(alone, runs[kind], strict=True)]
            out[f"{name}, {label}: bulk throughput with caller / alone"] = med(pairs)
            out[f"{name}, {label}: the same, lowest pair"] = min(pairs)
            out[f"{name}, {label}: the same, highest pair"] = max(pairs)
    return out


def batch_file(raw: dict[str, Any]) -> dict[str, float]:
    """``fleet batch run`` beside ``vllm run-batch``: each one's lines per second, (N - 1) over
    the difference of its N-line and one-line runs (medians), their ratio, the CLI's peak
    memory on a million lines, and the kill -9 resume's counts."""
    med = statistics.median
    out: dict[str, float] = {}
    rate = {}
    for system in ("fleet", "vllm"):
        runs = raw[system]
        rate[system] = (raw["n"] - 1) / (med(runs["n_s"]) - med(runs["one_s"]))
        out[f"{raw['n']} chat lines x {raw['max_tokens']}, {system} lines/s"] = rate[system]
        out[f"{system}: one-line run s"] = med(runs["one_s"])
    out["fleet batch run / vllm run-batch, lines/s"] = rate["fleet"] / rate["vllm"]
    if "memory" in raw:
        memory = raw["memory"]
        out[f"fleet batch run peak RSS on {memory['lines']} lines MB"] = (
            memory["peak_rss_bytes"] / 2**20)
    if "resume" in raw:
        resume = raw["resume"]
        out["kill -9 mid-job then resume: lines lost"] = resume["lost"]
        out["kill -9 mid-job then resume: custom_id written twice"] = resume["twice"]
    return out


REMOTE_SYSTEMS = {"direct": "aiohttp straight to the server", "delay": "fleet .delay()",
                  "batch": "fleet chat_batch"}


def remote(raw: dict[str, Any]) -> dict[str, float]:
    """The fleet through a remote engine beside an aiohttp client straight to the same server:
    requests per second (medians), the fleet's ratio to the client paired repetition by
    repetition (median, lowest, highest), CPU per request of each process, the worker's RSS."""
    med = statistics.median
    n, runs = raw["n"], raw["runs"]
    label = f"{n} chat x {raw['max_tokens']}"
    out: dict[str, float] = {}
    for system, name in REMOTE_SYSTEMS.items():
        out[f"{label}, {name} req/s"] = n / med(runs[system]["times"])
    for system in ("delay", "batch"):
        pairs = [d / f for d, f in zip(runs["direct"]["times"], runs[system]["times"],
                                       strict=True)]
        name = REMOTE_SYSTEMS[system]
        out[f"{name} / aiohttp direct, paired median"] = med(pairs)
        out[f"{name} / aiohttp direct, lowest pair"] = min(pairs)
        out[f"{name} / aiohttp direct, highest pair"] = max(pairs)
    for system, name in REMOTE_SYSTEMS.items():
        for key, what in (("server_cpu_s", "server"), ("worker_cpu_s", "worker"),
                          ("client_cpu_s", "client or producer")):
            if system == "direct" and key == "worker_cpu_s":
                continue
            out[f"{name}: {what} CPU per request ms"] = 1e3 * med(runs[system][key]) / n
    out["remote-engine worker RSS MB"] = raw["worker_rss_bytes"] / MB
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def table(figs: dict[str, Any]) -> str:
    rps = figs["requests_per_s"]
    names = [w.name for w in workloads()]
    lines = [f"{'requests/s':<28}" + "".join(f"{n:>14}" for n in names)]
    for system, values in rps.items():
        lines.append(f"{system:<28}" + "".join(
            f"{values[n]:>14.1f}" if n in values else f"{'-':>14}" for n in names))
    lines.append("")
    lines += [f"{k:<60}{v:>10.3f}" for k, v in figs["ratios"].items()]
    for section in ("paired", "cpu", "latency", "overhead", "memory", "gateway", "metrics",
                    "priority", "batch", "remote"):
        if section in figs:
            lines.append("")
            lines += rows(figs[section], 3 if section in ("paired", "metrics") else 2)
    return "\n".join(lines)


def rows(section: dict[str, float], digits: int = 2) -> list[str]:
    return [f"{k:<60}{v:>10.{digits}f}" for k, v in section.items()]


def write(raw: dict[str, Any]) -> None:
    figs = figures(raw)
    text = table(figs)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({"raw": raw, "figures": figs}, indent=2))
    (RESULTS / "latest.txt").write_text(text + "\n")
    chart(figs, RESULTS / "latest.png")


def chart(figs: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rps = figs["requests_per_s"]
    names = [w.name for w in workloads()]
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(len(rps), 1)
    for i, (system, values) in enumerate(rps.items()):
        xs = [j + i * width for j, n in enumerate(names) if n in values]
        ax.bar(xs, [values[n] for n in names if n in values], width, label=system)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylabel("requests per second (median)")
    ax.set_title("vllm-fleet vs the bare engine and the alternatives (tiny model, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
