# Agent Hub: `make run` starts a hub and a demo agent; `make test` runs lint and every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format typecheck bench bench-quick bench-dashboards bench-connections bench-store bench-layout bench-pipeline soak soak-reconnect clean help

help:
	@echo "make run          hub on https://127.0.0.1:8443 with a demo agent (SQLite, dev certificates)"
	@echo "make test         ruff, mypy, then the whole test suite"
	@echo "make bench        every benchmark (ingest beside a bare server and HTTP, connections, fan-out), about 10 min"
	@echo "make bench-quick  the same, shorter (about 2 min)"
	@echo "make bench-connections  what 5,000 idle agents over mTLS cost the hub (memory, CPU)"
	@echo "make bench-dashboards  the overview page in Chromium under live load; fan-out to 200 dashboards"
	@echo "make bench-store  the SQLite and PostgreSQL stores side by side: events/s, commit wait, bytes per event"
	@echo "make bench-layout  SQLite's CPU per stored event for event table layouts side by side"
	@echo "make bench-pipeline  the ingest pipeline without sockets: CPU per event by thread (BEFORE=tree to compare)"
	@echo "make soak         reliability checks that take minutes (kill -9 the hub, the store away 30 s, agents streaming)"
	@echo "make soak-reconnect  1,000 agents reconnecting for 10 minutes: the hub's RSS and open files level off"
	@echo "make typecheck    mypy on hub/ and agent_client/"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/agenthub demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q

# Ingest (the matrix: 10/100/1,000 agents x batches of 1/100 x JSON/msgpack, plots in docs/bench/),
# 5,000 connections and fan-out to 200 dashboards, then every figure beside its target.
bench: $(STAMP)
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

bench-dashboards: $(STAMP)
	$(BIN)/python -m bench.dashboards

bench-connections: $(STAMP)
	$(BIN)/python -m bench.connections

bench-store: $(STAMP)
	$(BIN)/python -m bench.store

bench-layout: $(STAMP)
	$(BIN)/python -m bench.event_layout

bench-pipeline: $(STAMP)
	$(BIN)/python -m bench.pipeline $(if $(BEFORE),--before $(BEFORE))

# The second run provokes gaps (earlier batches answered "overloaded" while later ones commit)
# and kills the hub while agents reconnect: RELIABILITY.md.
soak: $(STAMP)
	$(BIN)/python -m bench.reliability.kill9
	$(BIN)/python -m bench.reliability.kill9 --agents 20 --kills 20 --min-up 0.05 --max-up 1.5 \
		--hub-setting MAX_BATCH_EVENTS=10 --hub-setting MAX_BATCHES_IN_FLIGHT=1
	$(BIN)/python -m bench.reliability.outage --store sqlite
	$(BIN)/python -m bench.reliability.outage --store postgresql
	$(BIN)/python -m bench.reliability.slow_dashboard

soak-reconnect: $(STAMP)
	$(BIN)/python -m bench.reliability.reconnect

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
