package cpu

import "github.com/loopserve/loopserve/runtime/backend/ref"

// Reference is the reference backend (package ref), the oracle the CPU backend's kernels and
// steps are tested against.
type Reference = ref.Backend
