"""Liveness and readiness decisions, pure."""

from __future__ import annotations

from bgpd.health import PeerHealth, Probe, liveness, readiness


def test_ready_needs_a_reconcile_the_datastore_and_peers_up_or_within_grace() -> None:
    good = Probe(reconciled=True, datastore_ok=True, exabgp_alive=True,
                 peers=(PeerHealth("10.0.0.12", True, 0.0), PeerHealth("10.0.0.13", False, 30.0)), grace=120.0)
    assert readiness(good) == [] and liveness(good) == []
    late = Probe(reconciled=False, datastore_ok=False, exabgp_alive=True,
                 peers=(PeerHealth("10.0.0.13", False, 300.0),), grace=120.0)
    reasons = readiness(late)
    assert len(reasons) == 3 and any("10.0.0.13" in r for r in reasons) and any("etcd" in r for r in reasons)


def test_alive_unless_exabgp_is_gone_for_good() -> None:
    assert liveness(Probe(True, False, exabgp_alive=None)) == []  # BGP off; the datastore is readiness' business
    assert liveness(Probe(True, True, exabgp_alive=False)) != []


def test_log_format_json_and_bad_settings(capsys: object) -> None:
    import json
    import logging

    from bgpd import logs
    assert logs.setup({"LOG_FORMAT": "json", "LOG_LEVEL": "debug"}) is None
    logging.getLogger("calico-py-node.test").info("route added dst=%s", "10.244.1.0/26")
    line = capsys.readouterr().err.strip().splitlines()[-1]  # type: ignore[attr-defined]
    entry = json.loads(line)
    assert entry["message"] == "route added dst=10.244.1.0/26" and entry["level"] == "info"
    assert "LOG_FORMAT" in (logs.setup({"LOG_FORMAT": "xml"}) or "")
    assert "LOG_LEVEL" in (logs.setup({"LOG_LEVEL": "loud"}) or "")
    logs.setup({})
