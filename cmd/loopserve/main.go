// Command loopserve serves looped language models with adaptive depth: one binary for the
// operator, the runtime worker, the OpenAI-compatible gateway, a one-machine `up`, and the
// developer tools (generate, forward, tokenize, bench).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := newRoot().ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "loopserve:", err)
		stop()
		os.Exit(1)
	}
}

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "loopserve",
		Short: "Serve looped language models with adaptive depth",
		Long: `loopserve serves looped language models (LoopLM, e.g. Ouro) with per-token early exit:
every token runs the shared decoder stack up to R times and stops when its exit gate is
confident. It runs as a Kubernetes operator, runtime workers fed by NATS JetStream, and an
OpenAI-compatible gateway, or all on one machine with "loopserve up".`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(
		newUpCmd(),
		newOperatorCmd(),
		newWorkerCmd(),
		newGatewayCmd(),
		newGenerateCmd(),
		newForwardCmd(),
		newTokenizeCmd(),
		newBenchCmd(),
	)
	return root
}
