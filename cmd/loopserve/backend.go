package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
)

// backendFlags choose the compute backend: shared by worker, up, bench and the developer tools.
type backendFlags struct {
	name     string
	numerics string
	threads  int
}

func (f *backendFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.name, "backend", "cpu", "compute backend: cpu, or cuda (NVIDIA GPU through libcuda.so.1 and NVRTC, loaded at start; never run on a GPU yet: parity and speed unmeasured)")
	fl.StringVar(&f.numerics, "numerics", "exact", "arithmetic: exact (float32 activations, the goldens') or bf16 (bfloat16 activations: on the CPU AVX-512 BF16 dot products; faster, less accurate)")
	fl.IntVar(&f.threads, "threads", 0, "CPU backend goroutines per loop step (0: GOMAXPROCS)")
}

// backend returns the chosen backend.
func (f *backendFlags) backend() (engine.Backend, error) {
	switch f.name {
	case "cpu", "":
		num, err := cpu.ParseNumerics(f.numerics)
		if err != nil {
			return nil, fmt.Errorf("--numerics: %w", err)
		}
		if f.threads < 0 {
			return nil, fmt.Errorf("--threads %d: must not be negative", f.threads)
		}
		be, err := cpu.NewWith(cpu.Options{Threads: f.threads, Numerics: num})
		if err != nil {
			return nil, err
		}
		return be, nil
	case "cuda":
		num, err := cpu.ParseNumerics(f.numerics)
		if err != nil {
			return nil, fmt.Errorf("--numerics: %w", err)
		}
		be, err := cudaBackend(num == cpu.BF16)
		if err != nil {
			return nil, fmt.Errorf("--backend cuda: %w", err)
		}
		return be, nil
	}
	return nil, fmt.Errorf("--backend %q: want cpu or cuda", f.name)
}

// parseBytes parses a memory size: a byte count, or a number with a unit (KiB, MiB, GiB, TiB,
// or KB, MB, GB, TB in powers of 1000), e.g. "8GiB", "512MiB", "2e9".
func parseBytes(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := float64(1)
	for _, u := range []struct {
		suffix string
		mult   float64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v < 0 || v*mult > 1<<62 {
		return 0, fmt.Errorf("memory size %q: want bytes or a number with KiB, MiB, GiB, TiB (or KB, MB, GB, TB)", s)
	}
	return int64(v * mult), nil
}
