package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/runtime/serve"
)

func newGatewayCmd() *cobra.Command {
	var (
		listen, tokenFile                  string
		nf                                 natsFlags
		maxBody                            int64
		timeout, tokenReload, publishRetry time.Duration
	)
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "Run the OpenAI-compatible HTTP gateway",
		Long: `Serves /v1/completions, /v1/chat/completions and /v1/models for every LoopModel found in the
loopserve_models JetStream KV registry, forwarding requests through NATS JetStream.

It needs no Kubernetes access: the registry is followed live. It only binds to the buckets and
streams the operator created, never creates or changes them. Besides the OpenAI fields (those it
does not implement are refused with a 400 naming them), requests take top_k, exit_threshold,
max_depth and deadline_ms (anytime generation), and answers carry the loop depth of every token
in loop_depths.

Replies come back on loopserve.inbox.<gateway id>.*, and the gateway keeps its liveness key in
the loopserve_gateways bucket fresh, so workers stop generating for it once it is gone. While a
stream's leader is re-elected, a publish is retried for --publish-retry with the same
Nats-Msg-Id. A request whose estimated queue wait exceeds --request-timeout is answered 429 with
Retry-After; one that made its workers fail MaxDeliver times, 500.

/healthz says the process is alive; /readyz is ready once the registry is loaded (a missing one
counts as empty: no models, 404 per model) and the liveness key written (the operator creates its
bucket at start-up), and not while NATS is disconnected. /metrics serves Prometheus metrics.

Run the NATS servers with "jetstream { sync_interval: always }": with the default two-minute
fsync, Jepsen's analysis of NATS 2.12.1 lost acknowledged messages on crashes, and a request the
gateway accepted must not vanish.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tokens, err := readTokenFile(tokenFile)
			if err != nil {
				return err
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, nil))
			nc, err := nf.connect(cmd.Context(), "loopserve-gateway", log)
			if err != nil {
				return err
			}
			defer nc.Close()
			reg := prometheus.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
			m, err := serve.NewMetrics(reg)
			if err != nil {
				return err
			}
			g, err := serve.NewGateway(nc, serve.GatewayOptions{MaxBodyBytes: maxBody, Tokens: tokens, RequestTimeout: timeout,
				PublishRetry: publishRetry, Metrics: m, Gatherer: reg, Logger: log})
			if err != nil {
				return err
			}
			ln, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("listening on %s: %w", listen, err)
			}
			log.Info("gateway listening", "addr", ln.Addr().String(), "nats", nc.ConnectedUrlRedacted(), "id", g.ID(), "auth", len(tokens) > 0)
			ctx, cancel := context.WithCancel(cmd.Context())
			var wg sync.WaitGroup
			defer func() { cancel(); wg.Wait() }()
			if tokenFile != "" && tokenReload > 0 {
				wg.Go(func() { watchTokenFile(ctx, tokenFile, tokenReload, tokens, g, log) })
			}
			return serveGateway(ctx, g, ln)
		},
	}
	fl := cmd.Flags()
	nf.register(cmd)
	fl.StringVar(&listen, "listen", ":8080", "HTTP listen address")
	fl.StringVar(&tokenFile, "token-file", "", "file of accepted bearer tokens, one per line (e.g. a mounted Secret); empty: no authentication")
	fl.DurationVar(&tokenReload, "token-reload", 30*time.Second, "how often the token file is re-read, so a rotated Secret applies without a restart; 0: never")
	fl.Int64Var(&maxBody, "max-body", 1<<20, "request body limit in bytes")
	fl.DurationVar(&timeout, "request-timeout", 10*time.Minute, "longest a request may take, queueing included (jobs carry it as their expiry; keep the queue's MaxAge, 10m, above it)")
	fl.DurationVar(&publishRetry, "publish-retry", 5*time.Second, "how long a request's publish is retried while JetStream cannot take it (a stream leader election, a reconnection) before answering 503")
	return cmd
}

// readTokenFile returns the non-empty lines of path; "" means no tokens.
func readTokenFile(path string) ([]string, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading token file: %w", err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if t := strings.TrimSpace(line); t != "" {
			out = append(out, t)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("token file %s holds no token", path)
	}
	return out, nil
}

// tokenSetter takes the bearer tokens read again from the token file (the gateway).
type tokenSetter interface{ SetTokens(tokens []string) }

// watchTokenFile re-reads path every interval until ctx ends and hands changed tokens to g. A file
// that cannot be read or holds no token (a Secret mid-update) keeps the tokens in force.
func watchTokenFile(ctx context.Context, path string, every time.Duration, current []string, g tokenSetter, log *slog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		tokens, err := readTokenFile(path)
		if err != nil {
			log.Warn("keeping the bearer tokens in force", "err", err)
			continue
		}
		if !slices.Equal(tokens, current) {
			g.SetTokens(tokens)
			current = tokens
			log.Info("bearer tokens reloaded", "file", path, "tokens", len(tokens))
		}
	}
}

// serveGateway follows the registry and serves HTTP until ctx ends, then shuts down gracefully:
// requests in flight get 10s to finish while the gateway still receives their chunks, and only
// then does it stop (answering what is left with a 503 and deleting its liveness key).
func serveGateway(ctx context.Context, g *serve.Gateway, ln net.Listener) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	run, stopRun := context.WithCancel(context.Background())
	defer stopRun()
	srv := &http.Server{Handler: g, ReadHeaderTimeout: 10 * time.Second}
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	wg.Go(func() {
		if err := g.Run(run); err != nil {
			errs <- err
			cancel()
		}
	})
	wg.Go(func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errs <- fmt.Errorf("serving HTTP: %w", err)
			cancel()
		}
	})
	<-ctx.Done()
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	if srv.Shutdown(sctx) != nil {
		stopRun() // the streams still open end with a 503
		_ = srv.Close()
	}
	stopRun()
	wg.Wait()
	close(errs)
	return <-errs
}
