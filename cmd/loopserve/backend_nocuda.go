//go:build nocuda

package main

import (
	"errors"

	"github.com/loopserve/loopserve/runtime/engine"
)

// errCUDANotBuilt answers --backend cuda in a binary built with the nocuda tag (no CUDA
// backend, no purego).
var errCUDANotBuilt = errors.New("this binary is built without the CUDA backend (build tag nocuda); use --backend cpu")

func cudaBackend(bool) (engine.Backend, error) { return nil, errCUDANotBuilt }
