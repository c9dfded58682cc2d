package main

import "github.com/spf13/cobra"

func newOperatorCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "operator",
		Short: "Run the LoopModel Kubernetes operator",
		Long: `Reconciles LoopModel resources into runtime Deployments, Services and ConfigMaps, creates their
JetStream streams, scales them by loop-steps per second and retunes their exit thresholds.`,
		Args: cobra.NoArgs,
		RunE: notImplemented("operator"),
	}
}
