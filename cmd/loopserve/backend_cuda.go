//go:build !nocuda

package main

import (
	"github.com/loopserve/loopserve/runtime/backend/cuda"
	"github.com/loopserve/loopserve/runtime/engine"
)

// cudaBackend is the CUDA backend on device 0 when the driver, NVRTC and a device are there;
// otherwise the lookup's error (naming the missing library, e.g. libcuda.so.1).
func cudaBackend(bf16 bool) (engine.Backend, error) {
	if err := cuda.Available(); err != nil {
		return nil, err
	}
	return cuda.New(cuda.Options{BF16: bf16}), nil
}
