"""`dynasorctl bench store`: records per second the proxy's recorder sustains into one store,
from several processes at once (as several proxies on one store write).

Each writer is its own process running the proxy's own `Recorder` (bounded queue, batches
of up to 500, a worker thread) over `write_records`, fed as fast as its queue takes records:
realistic rows (every column the proxy fills; one request in five probed 16 times, as
`bench dashboard` seeds). The writers start together (they wait for a go file once
imported) and count the records written in the measured seconds. A benchmark, not a test.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from dynasorctl.bench.dashboard_bench import _requests
from proxy.metrics import Metrics
from proxy.store.db import open_store
from proxy.store.recorder import Record, Recorder, write_records

QUEUE = 10_000


@dataclass(frozen=True)
class StoreRate:
    url: str
    writers: int
    seconds: float
    records: int  # written in the measured seconds, all writers
    write_errors: int

    @property
    def per_second(self) -> float:
        return self.records / self.seconds


async def _write_for(url: str, writer: int, seconds: float, go: Path) -> dict[str, int]:
    engine = open_store(url, migrate=False)
    metrics = Metrics()
    recorder = Recorder(partial(write_records, engine), metrics, QUEUE)
    rows = _requests(10**9, datetime.now(UTC), random.Random(writer))
    go.with_name(f"ready{writer}").touch()
    while not go.exists():
        await asyncio.sleep(0.005)
    recorder.start()
    end = time.monotonic() + seconds
    put = 0
    while time.monotonic() < end:
        if recorder.pending >= QUEUE - 500:
            await asyncio.sleep(0.001)  # full: the writer is the bottleneck, as measured
            continue
        request, its_probes = next(rows)
        request["id"] = f"w{writer}-{request['id'][-20:]}"
        for p in its_probes:
            p["request_id"] = request["id"]
        recorder.put(Record(request, its_probes))
        put += 1
        if put % 64 == 0:
            await asyncio.sleep(0)  # let the recorder's task hand batches to its thread
    written = metrics.records_written
    await recorder.close(timeout_s=60)
    engine.dispose()
    return {"records": written, "errors": metrics.write_errors}


def writer_main() -> None:
    """One writer process: `python -c '...writer_main()' URL WRITER SECONDS GO`."""
    url, writer, seconds, go = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
    print(json.dumps(asyncio.run(_write_for(url, writer, seconds, go))))


def run(url: str, writers: int, seconds: float) -> StoreRate:
    """`writers` processes writing into the (migrated) store at `url` for `seconds`."""
    open_store(url).dispose()  # migrated once, before the writers start
    with tempfile.TemporaryDirectory() as tmp:
        go = Path(tmp) / "go"
        code = "from dynasorctl.bench.store_bench import writer_main; writer_main()"
        procs = [subprocess.Popen([sys.executable, "-c", code, url, str(i), str(seconds), str(go)],
                                  stdout=subprocess.PIPE, text=True) for i in range(writers)]
        deadline = time.monotonic() + 120
        while not all((Path(tmp) / f"ready{i}").exists() for i in range(writers)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError("the writers did not start")
            time.sleep(0.05)
        go.touch()  # all imported and connected: they start together
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=seconds + 300)
            if p.returncode != 0:
                raise RuntimeError(f"a writer failed (exit {p.returncode})")
            results.append(json.loads(out))
    return StoreRate(url, writers, seconds, sum(r["records"] for r in results),
                     sum(r["errors"] for r in results))
