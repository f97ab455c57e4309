# Every target does its own set-up on a fresh Debian 12 machine (as root): Debian packages when missing,
# a venv in .venv, the project installed editable with its test extras.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3
# gcc and libc6-dev (its libc.a): bgpd/cni/install.py builds the C CNI plugin, statically linked. nftables:
# NAT outgoing. tcpdump: the encapsulation tests look at the wire. openssl: the etcd TLS tests make their CA.
# containerd, runc, busybox-static: tests/e2e/test_containerd.py runs pods with ctr run --cni.
DEB_PACKAGES := etcd-server etcd-client iproute2 iputils-ping bird2 frr gobgpd graphviz \
	containernetworking-plugins iptables gcc libc6-dev nftables tcpdump openssl containerd runc busybox-static
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all deps venv test unit faults lint lab lab-destroy bench bench-smoke clean

all: test

deps:
	@scripts/ensure-debs $(DEB_PACKAGES)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	@touch $@

venv: $(STAMP)

# pytest exits 5 when it collected nothing: a suite that runs nothing must not pass.
test: deps venv
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (check testpaths)" >&2; exit 1; fi; \
	  exit $$rc

unit: venv
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

# The fault suite alone; FAULTS_SUMMARY keeps its closing table (one row per fault) in a file as well.
faults: deps venv
	FAULTS_SUMMARY=faults-summary.md $(VENV)/bin/python -m pytest tests/faults $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

LAB_TOPOLOGY ?= containerlab/topologies/mesh3.clab.yml
LAB := $(VENV)/bin/calico-py-lab

# The default lab, left running: nodes and links, BGP sessions, two pods per node made through the CNI plugin,
# each node's status and the pod-to-pod ping matrix; then how to look inside and take it down.
lab: deps venv
	$(LAB) demo -t $(LAB_TOPOLOGY)
	@echo; echo "The lab keeps running. Look inside: $(LAB) exec -t $(LAB_TOPOLOGY) --node node1 -- ip route"
	@echo "Take it down:       make lab-destroy   (or $(LAB) destroy -t $(LAB_TOPOLOGY))"

lab-destroy: venv
	$(LAB) destroy -t $(LAB_TOPOLOGY)

# Every benchmark, each printing our figure beside its anchor's from the same run; a failing one fails `make bench`.
# Their reports (stdout) are collected in bench/results.md; progress goes to the terminal.
BENCHES := bench/ipam_rate.py bench/cni_add.py bench/convergence.py bench/routes.py bench/scale.py
bench: deps venv
	@set -eo pipefail; out=bench/results.md; \
	printf '# Benchmarks\n\nRun %s on %s cores (make bench).\n\n' "$$(date -u +%FT%TZ)" "$$(nproc)" > $$out; \
	for b in $(BENCHES); do echo "== $$b"; $(VENV)/bin/python $$b | tee -a $$out; echo >> $$out; done; \
	echo "written: $$out"

# The guard CI runs after the tests: the benches at a small size, each ratio against bench/bounds.json.
bench-smoke: deps venv
	$(VENV)/bin/python bench/smoke.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
