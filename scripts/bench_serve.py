"""Load test of `unimodal serve`: N concurrent clients on 127.0.0.1, batching on vs one at a time.

Starts the server in this process (uvicorn in a thread) twice, once with request batching and once
serving one request at a time, and runs the same load against each: ``--clients`` threads, each
sending ``--requests`` chat completions (``max_tokens``, temperature 0.8, its own seed) through the
official ``openai`` client. Prints requests/s, completion tokens/s, p50/p95 latency and the
batching/one-at-a-time ratios measured in this run.

    python scripts/bench_serve.py runs/sft_tiny --clients 8 --requests 4
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import uvicorn

from prior.checkpoints.released import load_cola_pipeline
from prior.serving.server import ServeConfig, create_app
from unimodal.chat_data import synthetic_chat


def start(pipe, batching: bool, max_batch: int) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(pipe, ServeConfig(batching=batching, max_batch=max_batch, max_queue=1024))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    jobs = [(c, r) for c in range(clients) for r in range(requests)]

    def one(job):
        c, r = job
        messages = synthetic_chat(c * requests + r, "test")[0][:-1]
        t0 = time.perf_counter()
        out = client.chat.completions.create(model="cola", messages=messages, max_tokens=max_tokens,
                                             temperature=0.8, seed=c * 1000 + r)  # fmt: skip
        return time.perf_counter() - t0, out.usage.completion_tokens, out.choices[0].message.content

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "requests/s": len(jobs) / wall, "tokens/s": tokens / wall, "p50 s": statistics.median(latencies),
        "p95 s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], "wall s": wall, "tokens": tokens,
        "texts": [r[2] for r in results],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a Cola run / pipeline folder (e.g. an SFT run)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)
    pipe = load_cola_pipeline(args.checkpoint, purpose="bench_serve")
    pipe.set_progress_bar_config(disable=True)
    rows = {}
    for name, batching in (("one at a time", False), ("batched", True)):
        server, url = start(pipe, batching, args.clients)
        load(url, 1, 1, args.max_tokens)  # warm-up
        rows[name] = load(url, args.clients, args.requests, args.max_tokens)
        server.should_exit = True
    keys = ["requests/s", "tokens/s", "p50 s", "p95 s", "wall s", "tokens"]
    print(f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}")
    print("| server | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(
            f"| {name} | "
            + " | ".join(f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
            + " |"
        )
    a, b = rows["batched"], rows["one at a time"]
    same = sum(x == y for x, y in zip(a["texts"], b["texts"]))
    print(
        f"responses identical between the two servers (same requests, same seeds): {same}/{len(a['texts'])}"
    )
    print(f"batched / one at a time: tokens/s {a['tokens/s'] / b['tokens/s']:.2f}x, "
          f"requests/s {a['requests/s'] / b['requests/s']:.2f}x, p95 latency {a['p95 s'] / b['p95 s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
