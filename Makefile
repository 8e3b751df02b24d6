# make run: set up this machine (once) and start the agent profiling this host, UI on :8080.
# make test: the same set-up, then the whole test suite. Both are idempotent.
VENV := .venv
ARGS ?=

.PHONY: setup run test bench clean readme-flags

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/parca-agent $(ARGS)

test: setup
	$(VENV)/bin/pytest -ra -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) services/proto_gen build *.egg-info test-artifacts

readme-flags: setup
	$(VENV)/bin/python scripts/readme_flags.py
