package main

import "github.com/spf13/cobra"

func newBenchCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "bench",
		Short: "Measure runtime and serving speed against their peers",
		Long: `Benchmarks the runtime (decode and prefill tokens/s, memory bandwidth fraction, a PyTorch peer)
and the serving path (requests/s, TTFT, inter-token latency) side by side, reporting ratios.`,
		Args: cobra.NoArgs,
		RunE: notImplemented("bench"),
	}
}
