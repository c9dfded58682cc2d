#!/usr/bin/env bash
# gpu-check.sh: the CUDA backend's checks on a GPU host that has no Go, in one run of at most
# five minutes: the device, the parity tests on the device, and "bench runtime --backend cuda"
# on a 1.4B-shaped random model that the binary generates there (nothing large travels).
#
# Built on a Go machine and carried to the GPU host together with testdata/ (models, goldens
# and the 1.4B layout: a few MB):
#
#   CGO_ENABLED=0 go build -o loopserve ./cmd/loopserve
#   CGO_ENABLED=0 go test -c -o cuda.test ./runtime/backend/cuda
#
# Usage: hack/gpu-check.sh [--json] LOOPSERVE CUDA_TEST TESTDATA [WORKDIR]
#
# WORKDIR (default: a fresh temporary folder) receives the generated model (2.9 GB; kept, and
# reused by a second run) and the logs. With --json the bench figures are printed as the
# bench's JSON objects, one per line. Exit status: 0 when every stage passed.
set -euo pipefail

json=0
if [[ ${1:-} == --json ]]; then
	json=1
	shift
fi
if (($# < 3 || $# > 4)); then
	sed -n '2,17p' "$0" >&2
	exit 2
fi
bin=$(realpath "$1")
testbin=$(realpath "$2")
testdata=$(realpath "$3")
work=${4:-$(mktemp -d)}
mkdir -p "$work"
work=$(realpath "$work")
layout=$testdata/models/ouro-1.4b-layout
for f in "$bin" "$testbin" "$layout/config.json" "$testdata/golden"; do
	[[ -e $f ]] || { echo "gpu-check: $f not found" >&2; exit 2; }
done

budget=300 # seconds for the whole run
start=$SECONDS
failed=()
left() { echo $((budget - (SECONDS - start))); }

# stage NAME SECONDS CMD...: runs CMD with at most SECONDS (and never past the budget),
# its output to the terminal and WORKDIR/NAME.log.
stage() {
	local name=$1 limit=$2
	shift 2
	local l
	l=$(left)
	((limit > l)) && limit=$l
	if ((limit <= 0)); then
		echo "== $name: skipped, the ${budget}s budget is spent"
		failed+=("$name (no time)")
		return
	fi
	echo "== $name (at most ${limit}s)"
	local rc=0
	# bash -c: the stages below are shell functions (exported), which timeout cannot run itself.
	timeout --kill-after=5 "$limit" bash -c '"$@"' stage "$@" > >(tee "$work/$name.log") 2>&1 || rc=$?
	if ((rc != 0)); then
		((rc == 124 || rc == 137)) && echo "== $name: timed out after ${limit}s"
		echo "== $name: failed (exit $rc)"
		failed+=("$name")
	fi
}

device() {
	if command -v nvidia-smi >/dev/null; then
		nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory,pcie.link.gen.max --format=csv
	else
		echo "nvidia-smi not found"
	fi
	# The backend's own view: Available() reports why no device can be used.
	"$testbin" -test.run '^TestDeviceAvailable$' -test.v
}

parity() {
	# The tests find testdata at ../../../testdata, as in the repository.
	local dir=$work/repo/runtime/backend/cuda
	mkdir -p "$dir"
	ln -sfn "$testdata" "$work/repo/testdata"
	(cd "$dir" && LOOPSERVE_DEVICE_ONLY=1 "$testbin" -test.v -test.count=1 \
		-test.run '^(TestForwardMatchesGolden|TestGreedyMatchesGolden|TestBatchInvarianceAndReference|TestEarlyExitSavesLoopSteps|TestBF16ActivationsMeasured)$')
}

model=$work/ouro-1.4b-random
bench() { # bench BATCH THRESHOLD: one bench runtime run
	local args=(bench runtime --backend cuda --model "$model" --peer=false --prefill 512 --prompt 16 --tokens 32
		--batch "$1" --threshold "$2" --bandwidth-mib 256 --bandwidth-passes 1)
	((json)) && args+=(--json)
	"$bin" "${args[@]}"
}

export bin testbin testdata work model json
export -f device parity bench

stage device 30 device
stage parity 120 parity
stage mkmodel 60 "$bin" bench mkmodel --layout "$layout" --out "$model"
stage bench-b16 60 bench 16 0.5
stage bench-b64 60 bench 64 0

echo "== done in $((SECONDS - start))s; logs in $work"
if ((${#failed[@]})); then
	echo "== failed: ${failed[*]}"
	exit 1
fi
