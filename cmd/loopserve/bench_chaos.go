package main

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/runtime/serve/chaos"
)

func newBenchChaosCmd() *cobra.Command {
	var (
		modelDir         string
		o                chaos.Options
		asJSON, scripted bool
	)
	cmd := &cobra.Command{
		Use:   "chaos",
		Short: "Soak the serving path on a 3-node JetStream cluster with random node and worker kills",
		Long: `Starts three embedded NATS servers clustered on loopback (JetStream, sync_interval always, R3 work
queue and registry), the gateway and --workers workers on the model, and --clients streaming
clients that send the same prompts over and over. Until --duration is up it injects a random fault
every 3-10 s: the stream's leader killed, the node the gateway is connected to killed, a random
node killed (each restarted with its store at the next fault), or a worker killed mid-generation
(replaced by a fresh one). Every answer is compared with the answer its prompt gave before any
fault.

It prints accepted / completed / failed cleanly / lost / duplicated / corrupted and the faults,
and fails when any request was lost, duplicated or corrupted. --scripted runs the fixed plan of
the in-suite test instead (leader kill, restart, gateway's node kill, restart, worker kill).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			dir, cleanup, err := resolveModel(modelDir)
			if err != nil {
				return err
			}
			defer cleanup()
			store, err := os.MkdirTemp("", "loopserve-chaos-")
			if err != nil {
				return err
			}
			defer os.RemoveAll(store)
			o.ModelDir, o.Dir = dir, store
			if scripted {
				o.Plan = []chaos.Fault{chaos.KillStreamLeader, chaos.RestartNodes, chaos.KillGatewayNode, chaos.RestartNodes, chaos.KillWorker}
			}
			if !asJSON {
				o.Logf = func(format string, args ...any) { fmt.Fprintf(cmd.ErrOrStderr(), format+"\n", args...) }
			}
			rep, err := chaos.Run(cmd.Context(), o)
			if rep != nil {
				if asJSON {
					enc := json.NewEncoder(cmd.OutOrStdout())
					enc.SetIndent("", "  ")
					if jerr := enc.Encode(rep); jerr != nil {
						return jerr
					}
				} else {
					rep.Print(cmd.OutOrStdout())
				}
			}
			if err != nil {
				return err
			}
			if rep.Lost+rep.Duplicated+rep.Corrupted > 0 {
				return fmt.Errorf("%d lost, %d duplicated, %d corrupted requests", rep.Lost, rep.Duplicated, rep.Corrupted)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&modelDir, "model", "", "model directory (default: the shipped ouro-tiny-arith)")
	fl.DurationVar(&o.Duration, "duration", 2*time.Minute, "how long random faults are injected (the run ends once the clients finished)")
	fl.IntVar(&o.Clients, "clients", 16, "concurrent streaming clients")
	fl.IntVar(&o.Workers, "workers", 2, "workers (each with its own engine)")
	fl.IntVar(&o.Capacity, "capacity", 4, "requests each worker generates at once")
	fl.IntVar(&o.MaxTokens, "max-tokens", 12, "tokens per request")
	fl.IntVar(&o.Settle, "settle", 0, "requests that must complete before and after each fault (0: twice --clients)")
	fl.DurationVar(&o.AckWait, "ack-wait", 2*time.Second, "the queue's AckWait: how soon a killed worker's requests are redelivered")
	fl.DurationVar(&o.RequestTimeout, "request-timeout", 30*time.Second, "the gateway's request timeout (a request still unanswered then counts as lost)")
	fl.Uint64Var(&o.Seed, "seed", 1, "seed of the random faults")
	fl.BoolVar(&scripted, "scripted", false, "run the fixed fault plan of the in-suite test instead of random faults")
	fl.BoolVar(&asJSON, "json", false, "print the report as one JSON object (counts, faults with times in ns)")
	return cmd
}
