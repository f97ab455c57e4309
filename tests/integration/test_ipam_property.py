"""Random assign/release sequences on real etcd against an in-memory model of the same operations."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam.allocator import IPAM
from ipam.check import check, load_state
from ipam.errors import AddressInUse, PoolExhausted
from ipam.model import IPAddress
from tests.integration.ipamhelpers import add_pool, held_by_handle, store_for

pytestmark = pytest.mark.etcd

POOL = ipaddress.ip_network("10.77.0.0/27")  # four /29 blocks: small enough to run out often
HANDLES = [f"h{i}" for i in range(5)]
NODES = ["node-a", "node-b", "node-c"]

operations = st.one_of(
    st.tuples(st.just("auto"), st.sampled_from(HANDLES), st.sampled_from(NODES), st.integers(1, 3)),
    st.tuples(st.just("assign"), st.sampled_from(HANDLES), st.sampled_from(NODES), st.integers(0, 31)),
    st.tuples(st.just("release_handle"), st.sampled_from(HANDLES)),
    st.tuples(st.just("release_ip"), st.integers(0, 31)),
)


async def run(endpoints: list[str], ops: list[tuple]) -> None:
    async with store_for(endpoints) as store:
        await store.delete_prefix("/calico/")
        await add_pool(store, "p", str(POOL), 29)
        ipam = IPAM(store)
        model: dict[IPAddress, str] = {}
        for op in ops:
            if op[0] == "auto":
                _, handle, node, count = op
                if POOL.num_addresses - len(model) >= count:
                    got = (await ipam.auto_assign(handle, node, num_v4=count)).ipv4
                    assert len(got) == count and not set(got) & set(model)
                    model.update(dict.fromkeys(got, handle))
                else:
                    with pytest.raises(PoolExhausted):
                        await ipam.auto_assign(handle, node, num_v4=count)
            elif op[0] == "assign":
                _, handle, node, ordinal = op
                address = POOL.network_address + ordinal
                if address in model:
                    with pytest.raises(AddressInUse):
                        await ipam.assign_ip(address, handle, node)
                else:
                    await ipam.assign_ip(address, handle, node)
                    model[address] = handle
            elif op[0] == "release_handle":
                expected = sorted(a for a, h in model.items() if h == op[1])
                assert sorted(await ipam.release_by_handle(op[1])) == expected
                model = {a: h for a, h in model.items() if h != op[1]}
            else:
                address = POOL.network_address + op[1]
                not_freed = await ipam.release_ips([address])
                assert not_freed == ([] if address in model else [address])
                model.pop(address, None)

        held = await held_by_handle(store)
        assert {a: h for h, addresses in held.items() for a in addresses} == model
        state = await load_state(store)
        assert set(state.handles) == set(model.values())
        report = check(state)
        assert report.ok, report.problems


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operations, min_size=1, max_size=30))
def test_random_sequences_match_the_model(etcd_endpoints: list[str], ops: list[tuple]) -> None:
    asyncio.run(run(etcd_endpoints, ops))
