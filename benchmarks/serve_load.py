"""Load on an OpenAI-compatible server: N concurrent streaming clients, bounded in requests and
time, on loopback; ours (with and without speculation) beside llama-server's, in one run.

    python benchmarks/serve_load.py --model qwen2.5-coder-1.5b-instruct \
        [--draft-model qwen2.5-coder-0.5b-instruct] [--drafter draft-model] \
        --systems specdecode,specdecode-nospec,llama-server,llama-server-ngram \
        --concurrency 1,4,8 --requests 16 --max-tokens 128 --out runs/serve-load

Each system is started as a child process on a free local port: `specdecode serve` on the torch
backend, batching up to the highest concurrency (`-nospec`: speculation off; `-llamacpp`: on the
llama.cpp backend and the GGUF file llama-server runs, batched the same way; `-llamacpp-nospec`:
that without speculation), or llama-server
with `-np N` slots, plain or with its `ngram-simple` speculation (built by
`benchmarks/build_llama_server.sh`). At each concurrency, N client threads send greedy chat
requests (the suite's prompts in turn) with OpenAI's client, streaming, until `--requests` are
done or `--time-limit` seconds have passed; `--disconnect-every K` drops every K-th stream after
its first chunk (a soak's faults). Measured per request: time to first token, the gaps between
chunks, completion tokens (from the final chunk's usage); per level: output tokens per second
of wall time, errors, and the server's resident memory sampled every second. Writes
`results.jsonl`, `report.md`, `load.png` (throughput and time to first token by concurrency) and
`memory.png` (the server's memory through each level) to `--out`; `--report-only` rewrites the
last three from the first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SYSTEMS = (
    "specdecode",
    "specdecode-nospec",
    "specdecode-llamacpp",
    "specdecode-llamacpp-nospec",
    "llama-server",
    "llama-server-ngram",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """A server as a child process, ready when /health answers."""

    def __init__(self, command: list[str], port: int, env: dict | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=self.log, env=env
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                sys.exit(f"error: the server exited: {self.log.read()[-500:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.close()
        sys.exit("error: the server did not start in 10 minutes")

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: ours finishes what runs and exits
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


def start(system: str, args: argparse.Namespace, slots: int) -> ServerProcess:
    port = free_port()
    if system.startswith("specdecode"):
        command = [sys.executable, "-m", "specdecode", "serve", "--model", args.model,
                   "--port", str(port), "--served-model-name", "model",
                   "--max-batch", str(slots)]  # fmt: skip
        if "llamacpp" in system:  # the GGUF file llama-server runs
            command += ["--backend", "llamacpp"]
        if system.endswith("nospec"):
            command += ["--drafter", "none"]
        elif "llamacpp" not in system:
            if args.draft_model:
                command += ["--draft-model", args.draft_model]
            if args.drafter:
                command += ["--drafter", args.drafter]
        if args.threads:
            command += ["--threads", str(args.threads)]
        return ServerProcess(command, port)
    from specdecode.backends.llamacpp import user_environment
    from specdecode.bench.peers import SERVER_FLAGS, llama_server_path
    from specdecode.models import resolve_gguf

    binary = llama_server_path()
    if not binary.is_file():
        sys.exit(f"error: {binary} is missing: bash benchmarks/build_llama_server.sh")
    gguf = resolve_gguf(args.model)
    threads = str(args.threads or os.cpu_count())
    peer = "llamacpp-server-ngram" if system == "llama-server-ngram" else "llamacpp-server"
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-t", threads, "-tb", threads, "-c", str(4096 * slots), "-np", str(slots),
               "--no-webui", "-a", "model", *SERVER_FLAGS[peer]]  # fmt: skip
    return ServerProcess(command, port, env=user_environment())


def one_request(client, messages: list[dict], max_tokens: int, drop: bool) -> dict:
    started = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    try:
        stream = client.chat.completions.create(
            model="model", messages=messages, max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = now - started
                else:
                    gaps.append(now - last)
                last = now
                if drop:
                    stream.close()
                    return {"dropped": True, "ttft": first, "gaps": [], "tokens": 0}
        return {"ttft": first, "gaps": gaps, "tokens": tokens, "seconds": last and last - started}
    except Exception as exc:  # noqa: BLE001 - an error is a measurement here
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def run_level(server, args, prompts, concurrency: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    memory: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            memory.append(server.rss_mb())
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    deadline = time.monotonic() + args.time_limit
    counter = iter(range(args.requests))
    lock = threading.Lock()
    results: list[dict] = []

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            drop = bool(args.disconnect_every) and index % args.disconnect_every == 1
            messages = prompts[index % len(prompts)].chat()
            outcome = one_request(client, messages, args.max_tokens, drop)
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    served = [r for r in results if "error" not in r and not r.get("dropped")]
    gaps = [g for r in served for g in r["gaps"]]
    ttfts = [r["ttft"] for r in served if r["ttft"] is not None]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(served),
        "dropped": sum(1 for r in results if r.get("dropped")),
        "errors": [r["error"] for r in results if "error" in r],
        "output_tokens": sum(r["tokens"] for r in served),
        "wall_seconds": wall,
        "tokens_per_second": sum(r["tokens"] for r in served) / wall,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p99": percentile(ttfts, 0.99),
        "chunk_gap_p50": percentile(gaps, 0.5),
        "chunk_gap_p99": percentile(gaps, 0.99),
        "rss_mb": memory,
    }


def report(rows: list[dict], out: Path, command: str) -> None:
    lines = [
        "| system | concurrency | requests | errors | tokens/s | TTFT p50 | TTFT p99 | "
        "chunk gap p50 | chunk gap p99 | RSS MB (first / max / last) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    for r in rows:
        rss = [m for m in r["rss_mb"] if m == m] or [float("nan")]
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['requests']} | {len(r['errors'])} | "
            f"{r['tokens_per_second']:.2f} | {ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | "
            f"{ms(r['chunk_gap_p50'])} | {ms(r['chunk_gap_p99'])} | "
            f"{rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f} |"
        )
    lines += ["", f"Command: `{command}`", ""]
    (out / "report.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        levels = [r["concurrency"] for r in mine]
        left.plot(levels, [r["tokens_per_second"] for r in mine], marker="o", label=system)
        right.plot(levels, [(r["ttft_p50"] or 0) * 1000 for r in mine], marker="o", label=system)
    left.set_xlabel("concurrent streams")
    left.set_ylabel("output tokens/s")
    right.set_xlabel("concurrent streams")
    right.set_ylabel("time to first token, p50 (ms)")
    left.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "load.png", dpi=110)
    plt.close(fig)
    # Memory over each level's run (sampled each second): flat once every slot is in use.
    fig, axis = plt.subplots(figsize=(7, 3.5))
    for r in rows:
        label = f"{r['system']} x{r['concurrency']}"
        axis.plot(range(len(r["rss_mb"])), r["rss_mb"], label=label, linewidth=1)
    axis.set_xlabel("seconds into the level")
    axis.set_ylabel("server RSS (MB)")
    axis.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)


def _recorded_command(out: Path) -> str:
    """The command line of the run that wrote `out`, as its report gives it."""
    for line in (out / "report.md").read_text().splitlines():
        if line.startswith("Command: `"):
            return line.removeprefix("Command: `").removesuffix("`")
    return "(unknown)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--draft-model")
    parser.add_argument("--drafter")
    parser.add_argument("--systems", default="specdecode,specdecode-nospec")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--requests", type=int, default=16, help="per level (default 16)")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--suite", default="spec-bench")
    parser.add_argument("--disconnect-every", type=int, default=0, metavar="K")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report and plots")
    args = parser.parse_args()
    if args.report_only:
        with (args.out / "results.jsonl").open() as log:
            rows = [json.loads(line) for line in log]
        report(rows, args.out, _recorded_command(args.out))
        return
    systems = args.systems.split(",")
    if unknown := [s for s in systems if s not in SYSTEMS]:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    if min(levels) < 1 or args.requests < 1:
        parser.error("concurrency and --requests must be at least 1")
    from specdecode.bench.suites import load_suite

    prompts = load_suite(args.suite)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with (args.out / "results.jsonl").open("w") as log:
        for system in systems:
            server = None
            for level in levels:
                if server is None or system.startswith("llama-server"):  # -np is fixed at start
                    if server is not None:
                        server.close()
                    # Ours batches up to the highest level (its forks are made as they are needed).
                    slots = level if system.startswith("llama-server") else max(levels)
                    server = start(system, args, slots)
                row = {"system": system, **run_level(server, args, prompts, level)}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(
                    f"{system} x{level}: {row['tokens_per_second']:.2f} tokens/s, "
                    f"{row['completed']}/{row['requests']} completed, {len(row['errors'])} errors",
                    file=sys.stderr,
                )
            if server is not None:
                server.close()
    report(rows, args.out, "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
