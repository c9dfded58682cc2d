package main

import "github.com/spf13/cobra"

func newWorkerCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "worker",
		Short: "Run a runtime worker for one LoopModel",
		Long: `Pulls requests from the LoopModel's JetStream work queue, generates with adaptive depth and
publishes token chunks (with per-token loop depth) to each request's reply subject.`,
		Args: cobra.NoArgs,
		RunE: notImplemented("worker"),
	}
}
