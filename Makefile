# loopserve — build, test, generate, lint, bench.
# `make test` is the whole suite (what CI runs): envtest binaries, vet, lint, tests with -race.

SHELL         := /bin/bash
GO            ?= go
BIN           ?= bin/loopserve
STATICCHECK   ?= $(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2
CONTROLLER_GEN ?= $(GO) run sigs.k8s.io/controller-tools/cmd/controller-gen@v0.23.0
# Every package runs under the race detector (RACE= turns it off for a quick local run).
RACE          ?= -race
TESTFLAGS     ?= -count=1 -timeout 20m
PKGS          ?= ./...

.PHONY: all build up test e2e targets vet lint generate envtest-assets chart-tools docker-build bench clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN) ./cmd/loopserve

envtest-assets:
	@hack/envtest-assets.sh

# helm and the Prometheus Operator CRDs for the chart tests, cached like the envtest binaries.
chart-tools:
	@hack/chart-tools.sh

vet:
	$(GO) vet ./...

lint: vet
	$(STATICCHECK) ./...

# The envtest and chart-tools folders come from their builders (cached outside the clone); testsum
# prints the usual per-package lines plus "N passed, N failed, N skipped" and fails when no test ran.
# test/e2e runs when the cluster binaries (hack/envtest-assets.sh --cluster, kubectl included) are
# cached and network namespaces can be made; otherwise it skips, saying why.
test: lint
	@assets=$$(hack/envtest-assets.sh) && tools=$$(hack/chart-tools.sh) && \
	echo "KUBEBUILDER_ASSETS=$$assets LOOPSERVE_CHART_TOOLS=$$tools" && \
	set -o pipefail && \
	KUBEBUILDER_ASSETS=$$assets LOOPSERVE_CHART_TOOLS=$$tools CGO_ENABLED=1 $(GO) test $(RACE) $(TESTFLAGS) -json $(PKGS) 2>&1 | $(GO) run ./hack/testsum
	@$(MAKE) --no-print-directory targets

# The tuner's targets on the default trace (gatepolicy/sim TestTargets skips under -race, where the
# simulation takes minutes): run without the race detector. `make targets FULL=1` runs all eight
# traces of the README's table (~7 minutes on 2 cores).
targets:
	@set -o pipefail && $(GO) test -count=1 $(if $(FULL),,-short) -run '^TestTargets$$' -json ./gatepolicy/sim 2>&1 | $(GO) run ./hack/testsum

# The end-to-end tests alone (test/e2e): the README's Kubernetes quickstart on a one-machine
# cluster. Builds the control plane with kubectl and helm first (cached); needs root for the pods'
# network namespaces. `make test` runs them too when those binaries are cached.
e2e:
	@assets=$$(hack/envtest-assets.sh --cluster) && tools=$$(hack/chart-tools.sh) && \
	echo "KUBEBUILDER_ASSETS=$$assets LOOPSERVE_CHART_TOOLS=$$tools" && \
	KUBEBUILDER_ASSETS=$$assets LOOPSERVE_CHART_TOOLS=$$tools $(GO) test -count=1 -timeout 20m -v ./test/e2e/

# Keep in step with api/v1alpha1/generate_test.go, which regenerates into a temp dir and fails
# when the committed files are stale. The chart ships copies of the CRD and the operator's rules.
generate:
	$(CONTROLLER_GEN) object paths=./api/...
	$(CONTROLLER_GEN) crd:allowDangerousTypes=true rbac:roleName=loopserve-operator paths=./api/... paths=./controllers/... \
		output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac
	cp config/crd/bases/loopserve.io_loopmodels.yaml charts/loopserve/crds/
	cp config/rbac/role.yaml charts/loopserve/files/operator-role.yaml

bench:
	$(GO) test -run '^$$' -bench . -benchtime 3x ./runtime/...

# Images (needs a Docker engine): the static CPU image (operator, gateway, CPU workers) and the
# GPU worker image on the NVIDIA CUDA runtime base.
IMAGE         ?= ghcr.io/loopserve/loopserve
TAG           ?= dev
DOCKER        ?= docker

docker-build:
	$(DOCKER) build --target cpu -t $(IMAGE):$(TAG) .
	$(DOCKER) build --target gpu -t $(IMAGE):$(TAG)-gpu .

clean:
	rm -rf bin

# The main job on one machine: embedded NATS, one worker, the gateway on :8080.
up: build
	$(BIN) up
