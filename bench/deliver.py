"""Events per second delivered to a local fake Graph API: batches against one event per request.

Fills an outbox with pending events, then lets the real host dispatcher drive the real
``meta_capi`` sender (outbox reads, Graph client, one transaction per batch) to drain it
against a fake Graph API in another process, twice in the same run: with
``batch_max = 1000`` and with ``batch_max = 1`` (how RudderStack, Segment and Jitsu send),
both with the same number of requests in flight. Prints events/s for each and the ratio.

    python -m bench.deliver [--events 20000] [--single-events 2000] [--in-flight 4]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.load import free_port, python, server
from gateway.delivery.dispatcher import Dispatcher
from gateway.domain import DeliveryOptions, SinkState, StoredEvent
from gateway.metrics import Metrics
from gateway.store.database import SqliteStore, Store
from plugins.meta_capi.graph import GraphClient
from plugins.meta_capi.sender import GraphSender, Route

SINK = "meta_capi"


async def fill(store: Store, count: int, run: str) -> None:
    now = time.time()
    pending = {SINK: SinkState(status="pending")}
    await asyncio.gather(
        *(
            store.insert_event(
                StoredEvent(
                    pk=0,
                    status="pending",
                    account_id="bench",
                    event_id=f"{run}-{i}",
                    event_name="Purchase",
                    conversation_id="conv_bench",
                    event_time=int(now),
                    event={
                        "event_name": "Purchase",
                        "event_id": f"{run}-{i}",
                        "event_time": int(now),
                        "action_source": "business_messaging",
                        "messaging_channel": "whatsapp",
                        "user_data": {
                            "whatsapp_business_account_id": "102290129340398",
                            "ctwa_clid": f"clid-{i}",
                        },
                        "custom_data": {"currency": "USD", "value": 19.99},
                    },
                    test_event_code=None,
                    received_at=now,
                    duration_ms=0.0,
                    deliveries=pending,
                )
            )
            for i in range(count)
        )
    )


async def drain(db: Path, port: int, count: int, batch_max: int, in_flight: int) -> float:
    store = await SqliteStore.open(db)
    try:
        await fill(store, count, f"b{batch_max}")
        async with aiohttp.ClientSession() as session:
            graph = GraphClient(
                session, graph_url=f"http://127.0.0.1:{port}", api_version="v25.0", timeout_s=30
            )
            metrics = Metrics()
            sender = GraphSender(
                graph,
                sink=SINK,
                routes={"bench": Route("1234567890", "bench-token")},
                partner_agent="ctwa-gateway",
                forced_test_event_code=None,
                throttle_floor_s=4.0,
                metrics=metrics,
                budget_s=600,
            )
            dispatcher = Dispatcher(
                sink=SINK,
                outbox=store.outbox,
                send=sender.send,
                options=DeliveryOptions(
                    batch_max=batch_max,
                    linger_ms=0,
                    retry_base_s=1.0,
                    retry_cap_s=5.0,
                    max_in_flight=in_flight,
                    shutdown_grace_s=5,
                    poll_s=0.05,
                ),
                send_timeout_s=60,
                owner="bench",
                metrics=metrics,
            )
            started = time.perf_counter()
            dispatcher.start()
            # Polling from outside is the measurement: the dispatcher exposes no "done" event.
            while await store.outbox.pending(SINK):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - started
            await dispatcher.stop()
        return elapsed
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--single-events", type=int, default=2_000)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, tuple[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        port = free_port()
        argv = [python(), "-m", "bench.fake_graph_server", str(port)]
        with server(argv, port, {}, folder / "graph.log"):
            for label, count, batch in (
                ("batches of up to 1000", args.events, 1000),
                ("one event per request", args.single_events, 1),
            ):
                elapsed = asyncio.run(
                    drain(folder / f"{batch}.sqlite3", port, count, batch, args.in_flight)
                )
                results[label] = (count, elapsed)
    print(f"deliver: outbox drained to a local fake Graph API, {args.in_flight} requests in flight")
    print(f"{'mode':<26}{'events':>9}{'seconds':>10}{'events/s':>11}")
    for label, (count, elapsed) in results.items():
        print(f"{label:<26}{count:>9}{elapsed:>10.2f}{count / elapsed:>11.0f}")
    batched = args.events / results["batches of up to 1000"][1]
    single = args.single_events / results["one event per request"][1]
    print(f"ratio (batched / one per request): {batched / single:.1f}x")


if __name__ == "__main__":
    main()
