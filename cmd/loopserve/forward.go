package main

import "github.com/spf13/cobra"

func newForwardCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "forward",
		Short: "Run one exact forward pass and dump every loop step's outputs",
		Long: `Computes every loop step for every prompt token and writes input_ids, step_logits, gate_logits
and exit_pdf to a safetensors file.`,
		Args: cobra.NoArgs,
		RunE: notImplemented("forward"),
	}
}
