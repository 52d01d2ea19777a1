# Targets match the README. `make demo` and `make test` are the two set-up commands.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench bench-ingest bench-dimse bench-hl7 bench-fhir bench-cohort clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install  ## sample studies ingested and served on http://127.0.0.1:8042
	$(VENV)/bin/medlake demo

test: install  ## the whole suite (SQLite and, when reachable, PostgreSQL; browser tests included)
	scripts/install-system-deps.sh
	scripts/install-ohif.sh
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not browser and not cloud" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: install  ## medlake vs Orthanc peer benchmark (~5 min); results in bench-results/
	benchmarks/dicomweb_vs_orthanc.sh

bench-ingest: install  ## medlake ingest vs cp -r + sync, 100k small files (~20 min); bench-results/
	benchmarks/ingest_vs_cp.sh

bench-dimse: install  ## DIMSE C-STORE rate and C-FIND latency vs Orthanc (~6 min; ORTHANC_RESULTS=... ~1 min)
	benchmarks/dimse_vs_orthanc.sh

bench-hl7: install  ## HL7 v2 over MLLP: messages/s on one connection, stored before each ACK (~1 min)
	$(PY) benchmarks/hl7_mllp.py

bench-fhir: install  ## FHIR $$import and transaction rates, $$export of 1M resources with peak RSS (~15 min)
	$(PY) benchmarks/fhir_bulk.py --out bench-results/fhir-bulk.txt

bench-cohort: install  ## cohort queries on 100k patients / 1M instances, SQLite and PostgreSQL (~15 min)
	mkdir -p bench-results
	$(PY) benchmarks/cohort_scale.py --patients 100000 --db both --out bench-results/cohort.txt

clean:
	rm -rf demo-data bench-results .pytest_cache .mypy_cache .ruff_cache
