package main

import "github.com/spf13/cobra"

func newGatewayCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "gateway",
		Short: "Run the OpenAI-compatible HTTP gateway",
		Long: `Serves /v1/completions, /v1/chat/completions and /v1/models for every LoopModel found in the
loopserve_models JetStream KV registry, forwarding requests through NATS JetStream.`,
		Args: cobra.NoArgs,
		RunE: notImplemented("gateway"),
	}
}
