//go:build !nocuda

package main

import (
	"errors"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/cudakern"
	"github.com/loopserve/loopserve/runtime/backend/cuda"
)

// TestCUDABackendFlag: where the CUDA driver is missing, --backend cuda is an error naming
// libcuda.so.1 (and the CPU backend still works); with a device it builds the CUDA backend.
func TestCUDABackendFlag(t *testing.T) {
	var f backendFlags
	cmd := &cobra.Command{Use: "x", RunE: func(*cobra.Command, []string) error { return nil }}
	f.register(cmd)
	cmd.SetArgs([]string{"--backend", "cuda"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	be, err := f.backend()
	if avail := cuda.Available(); avail == nil {
		if _, ok := be.(*cuda.Backend); !ok || err != nil {
			t.Errorf("--backend cuda with a device: %T, %v; want the CUDA backend", be, err)
		}
		return
	} else if errors.Is(avail, cudakern.ErrLibraryNotFound) && !strings.Contains(err.Error(), "libcuda.so.1") && !strings.Contains(err.Error(), "libnvrtc") {
		t.Errorf("--backend cuda without the driver: %v, want an error naming the library", err)
	}
	if err == nil || !strings.HasPrefix(err.Error(), "--backend cuda: ") {
		t.Errorf("--backend cuda without a device: %v, want an error naming the flag", err)
	}
	f.name = "cpu"
	if _, err := f.backend(); err != nil {
		t.Errorf("--backend cpu after a failed cuda: %v", err)
	}
}
