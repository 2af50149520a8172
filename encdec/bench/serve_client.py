"""The load test's clients: ``python -m encdec.bench.serve_client URL PLAN.json OUT.json``.

Runs in its own process (so the clients' Python does not share the server's interpreter lock)
with ``concurrency`` asyncio workers, each taking the next planned request and sending it with
the official ``openai`` client (no retries). A plan entry says what the client does: read to
the end (``complete``), close the stream after ``after_chunks`` chunks (``cancel``), or drop
the connection after ``after_s`` seconds whatever state the request is in (``disconnect``).
Every request's record (times on ``time.perf_counter``, the text, finish reasons, chunk counts)
goes to ``OUT.json``. Requests not started when ``--time-limit`` runs out are recorded as
``not_sent``; those running then are abandoned (``timed_out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


async def _stream(client: Any, item: dict[str, Any], rec: dict[str, Any]) -> None:
    stream = await client.completions.create(
        stream=True, stream_options={"include_usage": True}, **item["args"]
    )
    chunks = 0
    try:
        async for chunk in stream:
            chunks += 1
            if not chunk.choices:
                rec["completion_tokens"] = chunk.usage.completion_tokens
                rec["usage_chunks"] = rec.get("usage_chunks", 0) + 1
                continue
            choice = chunk.choices[0]
            rec.setdefault("t_first", time.perf_counter())
            rec["text"] += choice.text
            if choice.finish_reason is not None:
                rec["finish_reason"] = choice.finish_reason
                rec["finish_chunks"] += 1
            if item["action"] == "cancel" and chunks >= item["after_chunks"] and "finish_reason" not in rec:
                rec["outcome"] = "cancelled"
                return
        rec["outcome"] = "completed"
    finally:
        rec["chunks"] = chunks
        await stream.close()


async def _whole(client: Any, item: dict[str, Any], rec: dict[str, Any]) -> None:
    out = await client.completions.create(**item["args"])
    rec["text"] = out.choices[0].text
    rec["finish_reason"] = out.choices[0].finish_reason
    rec["finish_chunks"] = 1
    rec["completion_tokens"] = out.usage.completion_tokens
    rec["outcome"] = "completed"


async def _one(client: Any, item: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "index": item["index"],
        "text": "",
        "finish_chunks": 0,
        "t_send": time.perf_counter(),
    }
    run = (_stream if item["stream"] else _whole)(client, item, rec)
    try:
        if item["action"] == "disconnect":
            try:
                await asyncio.wait_for(run, timeout=item["after_s"])
            except TimeoutError:
                rec["outcome"] = "disconnected"
        else:
            await run
    except asyncio.CancelledError:
        rec["outcome"] = "timed_out"
        raise
    except Exception as e:  # noqa: BLE001 - recorded: the runner counts it as lost
        rec["outcome"] = "error"
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        rec["t_done"] = time.perf_counter()
    return rec


async def run_clients(
    url: str, plan: list[dict[str, Any]], concurrency: int, time_limit: float
) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=time_limit)
    todo = list(reversed(plan))
    records: list[dict[str, Any]] = []
    deadline = time.perf_counter() + time_limit

    async def worker() -> None:
        while todo and time.perf_counter() < deadline:
            item = todo.pop()
            rec = {"index": item["index"], "outcome": "timed_out", "text": "", "finish_chunks": 0}
            records.append(rec)
            rec.update(await _one(client, item))

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), timeout=time_limit)
    except TimeoutError:
        pass
    finally:
        await client.close()
    seen = {r["index"] for r in records}
    records += [{"index": p["index"], "outcome": "not_sent"} for p in plan if p["index"] not in seen]
    return sorted(records, key=lambda r: r["index"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("plan")
    parser.add_argument("out")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=600.0)
    args = parser.parse_args(argv)
    with open(args.plan) as f:
        plan = json.load(f)
    records = asyncio.run(run_clients(args.url, plan, args.concurrency, args.time_limit))
    with open(args.out, "w") as f:
        json.dump(records, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
