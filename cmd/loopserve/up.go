package main

import "github.com/spf13/cobra"

func newUpCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "up",
		Short: "Run the whole serving path on this machine",
		Long: `Starts an embedded NATS server with JetStream, one runtime worker and the OpenAI-compatible
gateway, serving the shipped default model (or --model), and prints a ready-to-paste request.`,
		Args: cobra.NoArgs,
		RunE: notImplemented("up"),
	}
}
