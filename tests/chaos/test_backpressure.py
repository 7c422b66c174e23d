"""Load: a consumer that stops reading pushes back on the sender (bounded inbox + ZeroMQ high-water marks)
instead of growing memory, and once it reads again every frame arrives, in order, none lost."""

import asyncio
import threading

import pytest

from transport import Hub, run
from transport.hostile import flood_producer, rss_mb

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(120)]

HWM = 50
TOTAL = 3000  # 64 KiB frames the producer wants to send: 190 MiB if nothing pushed back
RSS_BOUND_MB = 96  # growth allowed while the consumer is stalled


def test_a_stalled_consumer_pushes_back_and_loses_nothing():
    async def main():
        hub = Hub(hwm=HWM, max_frame_bytes=1 << 20, heartbeat_s=0.5)
        await hub.start()
        sent, blocked, resume = [], threading.Event(), threading.Event()
        before = rss_mb()
        producer = threading.Thread(target=flood_producer, args=(hub.endpoint, TOTAL, HWM, sent, blocked, resume),
                                    daemon=True)
        producer.start()
        try:
            assert await asyncio.to_thread(blocked.wait, 60), "the producer was never pushed back"
            await asyncio.sleep(1.0)  # let anything in flight settle
            stalled_at, growth = len(sent), rss_mb() - before
            assert stalled_at < TOTAL // 4, f"{stalled_at} frames accepted with nobody reading"
            assert growth < RSS_BOUND_MB, f"RSS grew {growth:.0f} MiB with the consumer stalled"
            peak = hub.load()["inbox_peak"]
            assert peak == HWM, f"inbox peak {peak}, hwm {HWM}"  # the bounded inbox is what filled
            resume.set()
            _, hello = await hub.recv(timeout=10)
            assert hello.role == "rollout"
            got = []
            while len(got) < TOTAL:
                _, msg = await hub.recv(timeout=30)
                got.append(msg.prompt_id)
            assert got == list(range(TOTAL)), "frames lost, repeated or reordered"
            assert sum(hub.rejected.values()) == 0
        finally:
            resume.set()
            await asyncio.to_thread(producer.join, 30)
            await hub.close()

    run(main())
