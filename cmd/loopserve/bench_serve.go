package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/runtime/serve/loadtest"
)

// servePoint is one measured (threshold, clients) point of `bench serve`.
type servePoint struct {
	Threshold         float64 `json:"threshold"`
	Clients           int     `json:"clients"`
	Requests          int     `json:"requests"`
	Errors            int     `json:"errors"`
	RequestsPerSec    float64 `json:"requests_per_s"`
	TokensPerSec      float64 `json:"tokens_per_s"`
	TTFTP50Ms         float64 `json:"ttft_p50_ms"`
	TTFTP95Ms         float64 `json:"ttft_p95_ms"`
	ITLP50Ms          float64 `json:"itl_p50_ms"`
	ITLP95Ms          float64 `json:"itl_p95_ms"`
	MeanDepth         float64 `json:"mean_depth"`           // engine: mean exit depth of decode tokens
	LoopStepsPerToken float64 `json:"loop_steps_per_token"` // engine: loop steps executed per decode token
	RowsPerIteration  float64 `json:"rows_per_iteration"`   // engine: rows (tokens in flight) per batch iteration
}

func newBenchServeCmd() *cobra.Command {
	var (
		modelDir, clientsFlag string
		threshold, lowered    float64
		duration              time.Duration
		maxTokens             int
		asJSON                bool
		ef                    serveEngineFlags
	)
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Measure the serving path: requests/s, TTFT and inter-token latency against loopserve up",
		Long: `Starts the whole serving path in process (embedded NATS, one worker, the gateway: what "loopserve
up" runs), drives it with 1, 8 and 32 concurrent streaming clients at the exit threshold --threshold
and again at --lowered, and prints requests/s, p50/p95 time to first token and inter-token latency
as the clients see them, plus the engine's loop steps executed per generated token next to the
mean exit depth (they match in fast mode without probes: early exits skip real work), and the
ratios lowered/base.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var clients []int
			for _, f := range strings.Split(clientsFlag, ",") {
				n, err := strconv.Atoi(strings.TrimSpace(f))
				if err != nil || n <= 0 {
					return fmt.Errorf("--clients: %q is not a positive integer", f)
				}
				clients = append(clients, n)
			}
			for _, tau := range []float64{threshold, lowered} {
				if !(tau > 0 && tau <= 1) {
					return fmt.Errorf("thresholds must be in (0, 1], got %v", tau)
				}
			}
			dir, cleanup, err := resolveModel(modelDir)
			if err != nil {
				return err
			}
			defer cleanup()
			r := bus.Ref{Namespace: "default", Name: loopModelName(dir)}
			ef.threshold = threshold
			ef.capacity = max(ef.capacity, 1)
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
			l, local, stop, err := startUp(cmd.Context(), log, upConfig{dir: dir, ref: r, listen: "127.0.0.1:0", engine: ef})
			if err != nil {
				return err
			}
			defer stop()

			var points []servePoint
			for _, tau := range []float64{threshold, lowered} {
				for _, c := range clients {
					before := l.Engine.Stats()
					res, err := loadtest.Run(cmd.Context(), loadtest.Options{URL: local.URL(), Model: r.String(), Clients: c,
						Duration: duration, MaxTokens: maxTokens, ExitThreshold: tau})
					if err != nil {
						return err
					}
					after := l.Engine.Stats()
					p := servePoint{Threshold: tau, Clients: c, Requests: res.Requests, Errors: res.Errors,
						RequestsPerSec: res.RequestsPerSecond(), TokensPerSec: res.TokensPerSecond(),
						TTFTP50Ms: ms(loadtest.Quantile(res.TTFT, 0.5)), TTFTP95Ms: ms(loadtest.Quantile(res.TTFT, 0.95)),
						ITLP50Ms: ms(loadtest.Quantile(res.ITL, 0.5)), ITLP95Ms: ms(loadtest.Quantile(res.ITL, 0.95))}
					// Decode tokens only: a request's first token comes from prefill, counted apart.
					if tok := after.DecodeTokens - before.DecodeTokens; tok > 0 {
						p.MeanDepth = float64(after.DecodeDepth-before.DecodeDepth) / float64(tok)
						p.LoopStepsPerToken = float64(after.LoopSteps-before.LoopSteps) / float64(tok)
					}
					if it := after.Iterations - before.Iterations; it > 0 {
						p.RowsPerIteration = float64(after.BatchRows-before.BatchRows) / float64(it)
					}
					if res.Errors > 0 {
						fmt.Fprintf(cmd.ErrOrStderr(), "tau %.2f, %d clients: %d failed requests, first: %v\n", tau, c, res.Errors, res.FirstErr)
					}
					points = append(points, p)
				}
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(map[string]any{"model": r.String(), "max_tokens": maxTokens, "duration_s": duration.Seconds(),
					"mode": ef.mode, "probe_fraction": ef.probeFraction, "loop_steps": l.Worker.MaxSteps, "points": points})
			}
			printServeReport(cmd.OutOrStdout(), r.String(), l.Worker.MaxSteps, ef, maxTokens, duration, points, len(clients))
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&modelDir, "model", "", "model directory (default: the shipped ouro-tiny-arith)")
	fl.StringVar(&clientsFlag, "clients", "1,8,32", "concurrent streaming clients, comma-separated")
	fl.Float64Var(&threshold, "base-threshold", 0.7, "exit threshold of the first pass")
	fl.Float64Var(&lowered, "lowered", 0.3, "exit threshold of the second pass (lower: shallower tokens)")
	fl.DurationVar(&duration, "duration", 5*time.Second, "time per point during which clients issue requests (those issued finish and count)")
	fl.IntVar(&maxTokens, "max-tokens", 32, "max_tokens per request")
	fl.BoolVar(&asJSON, "json", false, "print one JSON object instead of tables")
	ef.register(cmd, 0.7)
	_ = fl.MarkHidden("threshold") // per-request exit_threshold drives the passes
	_ = fl.Set("probe-fraction", "0")
	return cmd
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func printServeReport(out io.Writer, model string, steps int, ef serveEngineFlags, maxTokens int, d time.Duration, points []servePoint, perPass int) {
	fmt.Fprintf(out, "bench serve: %s (R = %d loop steps), mode %s, probe fraction %g, batch capacity %d, max_tokens %d, %s per point\n\n",
		model, steps, ef.mode, ef.probeFraction, ef.capacity, maxTokens, d)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "tau\tclients\treq/s\ttok/s\tTTFT p50 ms\tTTFT p95 ms\tITL p50 ms\tITL p95 ms\tmean depth\tsteps/token\trows/iter\terrors\t")
	for _, p := range points {
		fmt.Fprintf(tw, "%.2f\t%d\t%.1f\t%.0f\t%.1f\t%.1f\t%.3f\t%.3f\t%.2f\t%.2f\t%.1f\t%d\t\n", p.Threshold, p.Clients, p.RequestsPerSec, p.TokensPerSec,
			p.TTFTP50Ms, p.TTFTP95Ms, p.ITLP50Ms, p.ITLP95Ms, p.MeanDepth, p.LoopStepsPerToken, p.RowsPerIteration, p.Errors)
	}
	_ = tw.Flush()
	if len(points) != 2*perPass {
		return
	}
	fmt.Fprintf(out, "\nratios tau %.2f / tau %.2f (above 1 for req/s and below 1 for latencies mean the lower threshold is faster):\n",
		points[perPass].Threshold, points[0].Threshold)
	tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "clients\treq/s\tTTFT p50\tTTFT p95\tITL p50\tITL p95\tsteps/token\t")
	for i := range perPass {
		a, b := points[i], points[perPass+i]
		fmt.Fprintf(tw, "%d\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t\n", a.Clients, serveRatio(b.RequestsPerSec, a.RequestsPerSec),
			serveRatio(b.TTFTP50Ms, a.TTFTP50Ms), serveRatio(b.TTFTP95Ms, a.TTFTP95Ms), serveRatio(b.ITLP50Ms, a.ITLP50Ms), serveRatio(b.ITLP95Ms, a.ITLP95Ms),
			serveRatio(b.LoopStepsPerToken, a.LoopStepsPerToken))
	}
	_ = tw.Flush()
	for _, p := range points {
		if p.Clients == 8 {
			fmt.Fprintf(out, "\nat 8 clients, tau %.2f: %.3f loop steps executed per decode token, mean exit depth %.3f (R = %d)",
				p.Threshold, p.LoopStepsPerToken, p.MeanDepth, steps)
		}
	}
	fmt.Fprintln(out)
}

func serveRatio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}
