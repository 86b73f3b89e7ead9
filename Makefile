# Quick start: `make demo` runs a local mesh on the embedded defaults; `make test` runs the suite.
# Both create .venv on first use and install the exact stack in deps/requirements.lock.
PYTHON ?= python3.11
VENV   := .venv
UV     := .tools/bin/uv
UV_VERSION := 0.13.8
STAMP  := $(VENV)/.installed
NATIVE := crypto/native/_modexp_ifma.so

.PHONY: demo test test-all bench bench-secagg bench-fhe bench-round bench-peers lock install clean

# The demo mesh: 3 validators (committee 2-of-3, embedded head), 2 trainers (2 private
# QLoRA rounds), 3 miners (one honest, one returning garbage, one slow; 1 FHE epoch).
demo: $(STAMP) $(NATIVE)
	$(VENV)/bin/sealmesh testnet up --validators 3 --trainers 2 --miners 3 --rounds 2 --epochs 1 \
		--fault miner-1=garbage --fault miner-2=slow --timeout 900 --dir testnet

test: $(STAMP) $(NATIVE)
	$(VENV)/bin/python -m pytest -q

# Heavy tests too (Concrete-ML compile/FHE execution, large meshes).
test-all: $(STAMP) $(NATIVE)
	SEALMESH_SLOW=1 $(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python bench/gossip.py

# The privacy tax of one round for 1M parameters (about 8 minutes on 2 cores with the IFMA engine).
bench-secagg: $(STAMP) $(NATIVE)
	$(VENV)/bin/python bench/secagg.py --params 1000000

bench-fhe: $(STAMP)
	$(VENV)/bin/python bench/fhe.py

bench-round: $(STAMP) $(NATIVE)
	$(VENV)/bin/python bench/round.py

# sealmesh against Flower SecAgg+ and TenSEAL CKKS, 10 trainers x 1M values (issue 18;
# docs/benchmarks.md). flwr 1.42 would downgrade locked packages (packaging, rich, typer)
# and move certifi, so the peers live in their own venv: it sees the locked .venv's
# packages through a .pth (nothing is copied or changed there) and adds only flwr,
# tenseal and the versions they insist on, which shadow the lock's in .venv-peers alone.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS := flwr==1.42.0 tenseal==0.3.18
PEERS_ARGS ?= --json bench-peers.json

bench-peers: $(PEERS_STAMP) $(NATIVE)
	nice -n 10 $(PEERS_VENV)/bin/python bench/peers.py $(PEERS_ARGS)

$(PEERS_STAMP): $(STAMP)
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -c 'import sysconfig, pathlib, sys; pathlib.Path(sysconfig.get_paths()["purelib"], "zz-sealmesh-lock.pth").write_text("import site; site.addsitedir(%r)\n" % sys.argv[1])' \
		"$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(PEERS_VENV)/bin/python -m pip install --quiet $(PEERS)
	touch $(PEERS_STAMP)

install: $(STAMP) $(NATIVE)

$(UV):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target .tools uv==$(UV_VERSION)

# `uv pip sync` installs exactly the lock, without re-resolving: the lock carries the
# protobuf override (see deps/overrides.txt and the README) that a resolver would refuse.
$(STAMP): deps/requirements.lock pyproject.toml | $(UV)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(UV) pip sync --python $(VENV)/bin/python deps/requirements.lock
	$(UV) pip install --python $(VENV)/bin/python --no-deps -e .
	touch $(STAMP)

# The AVX-512 IFMA batch powmod (crypto/batch_powmod.py): optional, three times faster
# partial decryption where the CPU has IFMA. Without a C compiler the build prints why
# and everything runs on gmpy2 alone.
$(NATIVE): crypto/native/modexp_ifma.c
	$(CC) -O3 -shared -fPIC -o $@ $< || echo "note: $@ not built; crypto uses gmpy2 only (slower partial decryption)"

# Re-resolve the lock from deps/requirements.in with the overrides applied.
lock: | $(UV)
	$(UV) pip compile deps/requirements.in --override deps/overrides.txt --python-version 3.11 -o deps/requirements.lock

clean:
	rm -rf $(VENV) $(PEERS_VENV) .tools testnet $(NATIVE)
