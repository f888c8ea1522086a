# make demo: set up .venv (if absent) and run the main job. make test: the whole test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.parlai-poly-installed
DEMO_DIR ?= runs/demo

.PHONY: install demo test browser clean

install: $(STAMP)

# Order matters: torch first from the pinned CPU build, ParlAI without its stale pins, then us.
$(STAMP): setup.py constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -c constraints.txt 'setuptools<81' wheel torch
	$(PIP) install -q -c constraints.txt --no-deps parlai
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

demo: install
	$(PY) -m parlai_poly.demo --out $(DEMO_DIR)

test: install browser
	$(PY) -m pytest -q -n 2 tests

# tests/test_serve.py checks the server's page in Debian's chromium (as root, as CI runs)
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| { echo "make test needs Debian's chromium: apt-get install chromium (as root)"; exit 1; }

clean:
	rm -rf $(VENV) runs *.egg-info
