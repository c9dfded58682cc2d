package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/internal/progress"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
	"github.com/loopserve/loopserve/runtime/serve"
)

// serveEngineFlags are the engine settings shared by worker, up and bench serve.
type serveEngineFlags struct {
	threshold        float64
	mode             string
	kvPolicy         string
	probeFraction    float64
	capacity         int
	maxBatchedTokens int
	kvMemory         string
	backend          backendFlags
}

func (f *serveEngineFlags) register(cmd *cobra.Command, defaultThreshold float64) {
	fl := cmd.Flags()
	fl.Float64Var(&f.threshold, "threshold", defaultThreshold, "exit threshold τ in force at start (0: the model's early_exit_threshold)")
	fl.StringVar(&f.mode, "mode", "fast", "exit mode: fast (skipped loop steps are never computed) or exact (all steps, then select)")
	fl.StringVar(&f.kvPolicy, "kv-policy", "full", "decode KV cache policy: full (per-step caches) or last (one per layer, R× less memory)")
	fl.Float64Var(&f.probeFraction, "probe-fraction", 0.02, "fraction of tokens that run every loop step for unbiased depth statistics")
	fl.IntVar(&f.capacity, "capacity", 8, "requests generated at once (the engine's batch; the queue's MaxAckPending)")
	fl.IntVar(&f.maxBatchedTokens, "max-batched-tokens", 0, "rows of one engine iteration, prompt chunks and decode rows together; decode rows come first, so a long prompt never stalls them (0: 256 + --capacity)")
	fl.StringVar(&f.kvMemory, "kv-memory", "", "KV cache budget, e.g. 8GiB (empty: from the container's memory limit — cgroup memory.max — less the weights and headroom)")
	f.backend.register(cmd)
}

func (f *serveEngineFlags) options() (engine.Options, error) {
	mode, err := engine.ParseMode(f.mode)
	if err != nil {
		return engine.Options{}, err
	}
	kv, err := engine.ParseKVPolicy(f.kvPolicy)
	if err != nil {
		return engine.Options{}, err
	}
	if f.capacity <= 0 {
		return engine.Options{}, fmt.Errorf("--capacity must be positive")
	}
	if f.threshold < 0 || f.threshold > 1 {
		return engine.Options{}, fmt.Errorf("--threshold must be in [0, 1]")
	}
	if f.maxBatchedTokens < 0 {
		return engine.Options{}, fmt.Errorf("--max-batched-tokens must not be negative")
	}
	var kvBytes int64
	if f.kvMemory != "" {
		if kvBytes, err = parseBytes(f.kvMemory); err != nil {
			return engine.Options{}, fmt.Errorf("--kv-memory: %w", err)
		}
		if kvBytes == 0 {
			return engine.Options{}, fmt.Errorf("--kv-memory must be positive (leave it empty for the container's limit)")
		}
	}
	be, err := f.backend.backend()
	if err != nil {
		return engine.Options{}, err
	}
	return engine.Options{Backend: be, Mode: mode, KVPolicy: kv, MaxBatch: f.capacity, Threshold: f.threshold, ProbeFraction: f.probeFraction,
		MaxBatchedTokens: f.maxBatchedTokens, MaxKVBytes: kvBytes}, nil
}

// runEngine starts a loaded model's batching loop; stop waits for it and closes the model.
func runEngine(l *serve.Loaded) (stop func() error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	return func() error {
		cancel()
		err := <-done
		if errors.Is(err, context.Canceled) {
			err = nil
		}
		return errors.Join(err, l.Close())
	}
}

func newWorkerCmd() *cobra.Command {
	var (
		modelDir, ref, thresholdFile, metricsListen, name string
		nf                                                natsFlags
		createQueue                                       bool
		drain                                             time.Duration
		maxSteps, contextLength                           int
		ef                                                serveEngineFlags
	)
	cmd := &cobra.Command{
		Use:   "worker",
		Short: "Run a runtime worker for one LoopModel",
		Long: `Pulls requests from the LoopModel's JetStream work queue, generates with adaptive depth and
publishes token chunks (with per-token loop depth) to each request's reply subject, which must lie
under a gateway's inbox (loopserve.inbox.<gateway>.<request>; others are refused and counted).

It connects to NATS and waits for the LoopModel's queue (the operator creates it; --create-queue
for standalone use) before it loads the weights, so a missing queue never makes it reload a model
in a crash loop. --metrics-listen serves /healthz (the process is alive) from the start, and
/readyz once the worker takes requests; /metrics serves Prometheus metrics.

It shares the durable consumer "workers" with the LoopModel's other workers, takes at most
--capacity requests at a time, keeps them with InProgress heartbeats and acks each one only once
the gateway holds its whole output, or once that gateway is known gone (its liveness key in the
loopserve_gateways bucket expired); while the gateway is only unreachable it retries, then hands
the request back. A request that panics gets an error and the worker keeps running. It publishes
depth statistics on loopserve.stats.<ns>.<name> and applies thresholds received on
loopserve.ctl.<ns>.<name> at once.

Run the NATS servers with "jetstream { sync_interval: always }": with the default two-minute
fsync, Jepsen's analysis of NATS 2.12.1 lost acknowledged messages on crashes, and a request the
gateway accepted must not vanish.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := bus.ParseRef(ref)
			if err != nil {
				return err
			}
			if modelDir == "" {
				return fmt.Errorf("--model is required")
			}
			opts, err := ef.options()
			if err != nil {
				return err
			}
			if maxSteps < 0 || contextLength < 0 {
				return fmt.Errorf("--max-steps and --context-length must not be negative")
			}
			opts.MaxContext = contextLength
			log := slog.New(slog.NewTextHandler(os.Stderr, nil))
			return runWorker(cmd.Context(), log, workerConfig{ref: r, nats: nf, createQueue: createQueue, modelDir: modelDir, engine: opts,
				maxSteps: maxSteps, thresholdFile: thresholdFile, metricsListen: metricsListen, name: name, capacity: ef.capacity, drain: drain})
		},
	}
	fl := cmd.Flags()
	nf.register(cmd)
	fl.StringVar(&modelDir, "model", "", "model directory (Hugging Face layout: config.json, safetensors, tokenizer.json)")
	fl.StringVar(&ref, "loopmodel", "", "the LoopModel served, <namespace>/<name>")
	fl.StringVar(&thresholdFile, "threshold-file", "", `file with the operator's threshold ({"exitThreshold": x}), read at start; overrides --threshold`)
	fl.StringVar(&metricsListen, "metrics-listen", ":9090", "address serving /metrics, /healthz (alive) and /readyz (taking requests); empty: none")
	fl.StringVar(&name, "name", "", "worker name in stats (default: $POD_NAME or the host name)")
	fl.BoolVar(&createQueue, "create-queue", false, "create the LoopModel's stream and consumer if missing (the operator normally does; needs JetStream admin rights)")
	fl.DurationVar(&drain, "drain", 25*time.Second, "on SIGTERM, let requests in flight finish this long, then hand the rest back to the queue (keep below the pod's termination grace period)")
	fl.IntVar(&maxSteps, "max-steps", 0, "loop steps a token may run at most, below the model's total_ut_steps (0: all of them); the LoopModel's spec.loop.maxSteps")
	fl.IntVar(&contextLength, "context-length", 0, "prompt plus completion tokens per request (0: the model's max_position_embeddings); the LoopModel's spec.model.contextLength")
	ef.register(cmd, 0)
	_ = cmd.MarkFlagRequired("loopmodel")
	return cmd
}

type workerConfig struct {
	ref                          bus.Ref
	nats                         natsFlags
	modelDir                     string
	engine                       engine.Options
	maxSteps                     int
	thresholdFile, metricsListen string
	name                         string
	createQueue                  bool
	capacity                     int
	drain                        time.Duration
}

// runWorker connects to NATS, waits for the queue, serves the probes, and only then loads the
// model and runs the worker until ctx ends.
func runWorker(ctx context.Context, log *slog.Logger, c workerConfig) error {
	r, capacity, name := c.ref, c.capacity, c.name
	nc, err := c.nats.connect(ctx, "loopserve-worker "+r.String(), log)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("opening JetStream: %w", err)
	}
	if c.createQueue {
		if _, err := bus.EnsureQueue(ctx, js, r, bus.QueueOptions{MaxAckPending: capacity}); err != nil {
			return err
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m, err := serve.NewMetrics(reg)
	if err != nil {
		return err
	}
	var worker atomic.Pointer[serve.Worker]
	var phase atomic.Value // why /readyz says no before the worker exists
	phase.Store("waiting for the work queue " + r.Stream())
	var wg sync.WaitGroup
	defer wg.Wait()
	if c.metricsListen != "" {
		ln, err := net.Listen("tcp", c.metricsListen)
		if err != nil {
			return fmt.Errorf("listening on %s: %w", c.metricsListen, err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
		mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
			switch wk := worker.Load(); {
			case wk == nil:
				http.Error(w, phase.Load().(string), http.StatusServiceUnavailable)
			case !wk.Ready():
				http.Error(w, "not taking requests (NATS disconnected or stopping)", http.StatusServiceUnavailable)
			default:
				_, _ = w.Write([]byte("ok\n"))
			}
		})
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		wg.Go(func() { _ = srv.Serve(ln) })
		defer srv.Close()
	}
	if _, err := serve.AwaitQueue(ctx, js, r, log); err != nil {
		return nil // stopped while waiting
	}

	phase.Store("loading the weights from " + c.modelDir)
	pr := progress.New(os.Stderr, "loading "+c.modelDir, 64<<20)
	l, err := serve.LoadProgress(c.modelDir, c.engine, func(p model.Progress) { pr.Update(p.Done, p.Total) })
	if err != nil {
		return err
	}
	pr.Done()
	if c.maxSteps > 0 && c.maxSteps < l.Worker.MaxSteps {
		l.Worker.MaxSteps = c.maxSteps
	}
	stopEngine := runEngine(l)
	if name == "" {
		name = os.Getenv("POD_NAME")
	}
	wo := l.Worker
	wo.Ref, wo.Name, wo.Capacity, wo.Metrics, wo.Logger, wo.ThresholdFile, wo.Drain = r, name, capacity, m, log, c.thresholdFile, c.drain
	w, err := serve.NewWorker(nc, l.Engine, l.Tok, wo)
	if err != nil {
		return errors.Join(err, stopEngine())
	}
	worker.Store(w)
	log.Info("worker started", "loopmodel", r.String(), "nats", nc.ConnectedUrlRedacted(), "capacity", capacity, "threshold", l.Engine.Threshold())
	return errors.Join(w.Run(ctx), stopEngine())
}
