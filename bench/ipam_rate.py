"""IPAM allocation rate vs raw etcd compare-and-swap transactions, same clients, same etcd, same run.

Starts its own etcd (Debian etcd-server) on loopback, then:
  1. IPAM: 8 simulated nodes x 4 concurrent workers allocate 2,000 IPv4 addresses from one /20 pool;
  2. raw CAS, no contention: the same clients and workers create 2,000 distinct keys, each a one-key
     transaction guarded by mod_revision == 0;
  3. raw CAS, IPAM-like contention: the same workers read-modify-write one counter key per node (a node's
     workers share a block in IPAM), retrying on conflict until 2,000 writes landed.
Both with 32 independent clients and with one client per node. Prints markdown; nothing is asserted.
Usage: python bench/ipam_rate.py [--runs N] [--no-fsync]
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

from ipam.datastore import Datastore, ModRevisionIs, Put
from tests.etcdserver import EtcdCluster
from tests.integration.ipamhelpers import Outcome, add_pool, clients, close_clients, run_workers

NODES = 8
WORKERS = 4
TOTAL = 2000


async def timed(body: Callable[[], Awaitable[None]]) -> float:
    start = time.perf_counter()
    await body()
    return time.perf_counter() - start


async def one_run(endpoint: str, run: int, shared_per_node: bool) -> dict[str, float]:
    workers = clients([f"node-{i}" for i in range(NODES)], WORKERS, [endpoint], shared_per_node=shared_per_node)
    stores = [ipam.store for _, ipam in workers]
    try:
        await stores[0].delete_prefix("/")
        await add_pool(stores[0], "bench", "10.244.0.0/20")
        outcome = Outcome()
        ipam_s = await timed(lambda: run_workers(workers, TOTAL, outcome))
        assert not outcome.failed and len(set(outcome.addresses)) == TOTAL, outcome.failed
        conflicts = sum({id(i): i.stats["conflicts"] for _, i in workers}.values())

        counter = iter(range(TOTAL))

        async def create_worker(store: Datastore) -> None:
            for n in counter:
                key = f"/bench/{run}/create/{n}"
                assert (await store.txn([ModRevisionIs(key, 0)], [Put(key, b"x")])).succeeded

        raw_s = await timed(lambda: asyncio.gather(*(create_worker(s) for s in stores)))

        remaining = iter(range(TOTAL))

        async def rmw_worker(node: str, store: Datastore) -> None:
            key = f"/bench/{run}/rmw/{node}"
            for _ in remaining:
                while True:
                    kv = await store.get(key)
                    value = int(kv.value) + 1 if kv else 1
                    result = await store.txn([ModRevisionIs(key, kv.mod_revision if kv else 0)],
                                             [Put(key, str(value).encode())])
                    if result.succeeded:
                        break

        rmw_s = await timed(lambda: asyncio.gather(*(rmw_worker(node, ipam.store) for node, ipam in workers)))
        return {"ipam": TOTAL / ipam_s, "raw": TOTAL / raw_s, "rmw": TOTAL / rmw_s, "conflicts": conflicts}
    finally:
        await close_clients(workers)


def table(title: str, results: list[dict[str, float]]) -> None:
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(f"### {title}")
    print()
    print("| what | per second | ratio to IPAM |")
    print("|---|---:|---:|")
    print(f"| IPAM auto_assign (1 IPv4 each, /20 pool, /26 blocks) | {med['ipam']:,.0f} | 1.00 |")
    print(f"| raw CAS create, distinct keys (1 txn each) | {med['raw']:,.0f} | {med['raw'] / med['ipam']:.2f} |")
    print(f"| raw read + CAS, one key per node (IPAM-like contention) | {med['rmw']:,.0f} | "
          f"{med['rmw'] / med['ipam']:.2f} |")
    print()
    print(f"IPAM compare-and-swap conflicts retried per run (median): {med['conflicts']:.0f}")
    print()


async def main_async(runs: int, fsync: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="calico-py-bench-") as tmp, \
            EtcdCluster(1, Path(tmp), fsync=fsync) as etcd:
        endpoint = etcd.endpoints[0]
        independent = [await one_run(endpoint, run, False) for run in range(runs)]
        shared = [await one_run(endpoint, run + runs, True) for run in range(runs)]
    print(f"## IPAM allocation rate vs raw etcd CAS ({NODES} nodes x {WORKERS} workers, {TOTAL} requests; "
          f"etcd 3.4, one member on loopback, fsync {'on' if fsync else 'off'}; {os.cpu_count()} cores; "
          f"median of {runs} runs)")
    print()
    table("32 independent clients (one per worker, as separate processes)", independent)
    table("8 clients, one per node shared by its 4 workers (as one daemon per node)", shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-fsync", action="store_true", help="run etcd with --unsafe-no-fsync")
    args = parser.parse_args()
    asyncio.run(main_async(args.runs, fsync=not args.no_fsync))


if __name__ == "__main__":
    main()
