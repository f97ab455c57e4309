"""IPAM allocation rate vs raw etcd compare-and-swap transactions, same clients, same etcd, same run.

Starts its own etcd (Debian etcd-server) on loopback, then:
  1. IPAM: 8 simulated nodes x 4 concurrent workers allocate 2,000 IPv4 addresses from one /20 pool;
  2. raw CAS, no contention: the same clients and workers create 2,000 distinct keys, each a one-key
     transaction guarded by mod_revision == 0;
  3. raw CAS, IPAM-like contention: the same workers read-modify-write one counter key per node (a node's
     workers share a block in IPAM), retrying on conflict until 2,000 writes landed.
Prints a table; nothing is asserted. Usage: python bench/ipam_rate.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.etcdserver import EtcdCluster

from ipam.allocator import IPAM
from ipam.datastore import Datastore, EtcdConfig, ModRevisionIs, Put
from tests.integration.ipamhelpers import Outcome, add_pool, run_workers

NODES = 8
WORKERS = 4
TOTAL = 2000


async def timed(body: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await body()
    return time.perf_counter() - start


async def one_run(endpoint: str, run: int) -> dict[str, float]:
    stores = [Datastore(EtcdConfig.parse(endpoint)) for _ in range(NODES)]
    try:
        await stores[0].delete_prefix("/")
        await add_pool(stores[0], "bench", "10.244.0.0/20")
        ipams = {f"node-{i}": IPAM(s) for i, s in enumerate(stores)}
        outcome = Outcome()
        ipam_s = await timed(lambda: run_workers(ipams, TOTAL, WORKERS, outcome))
        assert not outcome.failed and len(set(outcome.addresses)) == TOTAL, outcome.failed
        conflicts = sum(i.stats["conflicts"] for i in ipams.values())

        counter = iter(range(TOTAL))

        async def create_worker(store: Datastore) -> None:
            for n in counter:
                key = f"/bench/{run}/create/{n}"
                assert (await store.txn([ModRevisionIs(key, 0)], [Put(key, b"x")])).succeeded

        raw_s = await timed(lambda: asyncio.gather(*(create_worker(s) for s in stores for _ in range(WORKERS))))

        remaining = iter(range(TOTAL))

        async def rmw_worker(node: int, store: Datastore) -> None:
            key = f"/bench/{run}/rmw/node-{node}"
            for _ in remaining:
                while True:
                    kv = await store.get(key)
                    value = int(kv.value) + 1 if kv else 1
                    result = await store.txn([ModRevisionIs(key, kv.mod_revision if kv else 0)],
                                             [Put(key, str(value).encode())])
                    if result.succeeded:
                        break

        rmw_s = await timed(lambda: asyncio.gather(*(rmw_worker(i, s) for i, s in enumerate(stores)
                                                     for _ in range(WORKERS))))
        return {"ipam": TOTAL / ipam_s, "raw": TOTAL / raw_s, "rmw": TOTAL / rmw_s, "conflicts": conflicts}
    finally:
        for store in stores:
            await store.close()


async def main_async(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="calico-py-bench-") as tmp, EtcdCluster(1, Path(tmp)) as etcd:
        endpoint = etcd.endpoints[0]
        results = [await one_run(endpoint, run) for run in range(runs)]
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    cores = os.cpu_count()
    print(f"IPAM allocation rate vs raw etcd CAS — {NODES} nodes x {WORKERS} workers, {TOTAL} requests, "
          f"etcd 3.4 single member on loopback, {cores} cores, median of {runs} runs")
    print()
    print("| what | per second | ratio to IPAM |")
    print("|---|---:|---:|")
    print(f"| IPAM auto_assign (1 IPv4 each, /20 pool, /26 blocks) | {med['ipam']:,.0f} | 1.00 |")
    print(f"| raw CAS create, distinct keys (1 txn each) | {med['raw']:,.0f} | {med['raw'] / med['ipam']:.2f} |")
    print(f"| raw read + CAS on one key per node (IPAM-like contention) | {med['rmw']:,.0f} | "
          f"{med['rmw'] / med['ipam']:.2f} |")
    print()
    print(f"IPAM CAS conflicts retried per run (median): {med['conflicts']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main_async(parser.parse_args().runs))


if __name__ == "__main__":
    main()
