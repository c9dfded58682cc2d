package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/internal/progress"
	"github.com/loopserve/loopserve/internal/randmodel"
)

// newBenchMkmodelCmd writes a random checkpoint of a layout: what hack/mkmodel writes, from
// the binary alone, so that a GPU host without Go generates the 1.4B-shaped model locally.
func newBenchMkmodelCmd() *cobra.Command {
	var (
		layout, out string
		seed        uint64
		force       bool
	)
	cmd := &cobra.Command{
		Use:   "mkmodel",
		Short: "Write a random bf16 checkpoint of a layout (config.json) for benchmarks",
		Long: `Copies LAYOUT/config.json to OUT and writes OUT/model.safetensors: deterministic pseudo-random
bf16 weights (normal with std initializer_range, norm weights 1, gate bias 0), streamed tensor by
tensor. The same as "go run ./hack/mkmodel"; e.g. --layout testdata/models/ouro-1.4b-layout writes
2.9 GB. An existing model.safetensors is kept unless --force.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if layout == "" || out == "" {
				return fmt.Errorf("--layout and --out are required")
			}
			stderr := cmd.ErrOrStderr()
			dst := filepath.Join(out, "model.safetensors")
			if _, err := os.Stat(dst); err == nil && !force {
				fmt.Fprintf(stderr, "%s exists (use --force to rewrite)\n", dst)
				return nil
			}
			r := progress.New(stderr, "writing "+dst, 0)
			if err := randmodel.Write(cmd.Context(), layout, out, seed, r.Update); err != nil {
				return err
			}
			r.Done()
			fmt.Fprintln(stderr, "wrote", out)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&layout, "layout", "", "folder whose config.json gives the model's shape")
	fl.StringVar(&out, "out", "", "output folder")
	fl.Uint64Var(&seed, "seed", 1, "random seed (the same seed writes the same bytes)")
	fl.BoolVar(&force, "force", false, "rewrite an existing model.safetensors")
	return cmd
}
