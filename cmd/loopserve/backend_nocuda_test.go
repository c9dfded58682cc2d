//go:build nocuda

package main

import (
	"errors"
	"testing"
)

func TestCUDABackendNotBuilt(t *testing.T) {
	f := backendFlags{name: "cuda", numerics: "exact"}
	if _, err := f.backend(); !errors.Is(err, errCUDANotBuilt) {
		t.Errorf("--backend cuda in a nocuda build: %v, want errCUDANotBuilt", err)
	}
}
