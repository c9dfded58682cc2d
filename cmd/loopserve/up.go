package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/bus"
	"github.com/loopserve/loopserve/gatepolicy"
	"github.com/loopserve/loopserve/internal/progress"
	"github.com/loopserve/loopserve/runtime/model"
	"github.com/loopserve/loopserve/runtime/serve"
	"github.com/loopserve/loopserve/runtime/serve/defaultmodel"
)

func newUpCmd() *cobra.Command {
	var (
		modelDir, ref, listen, dataDir, tokenFile string
		natsPort                                  int
		ef                                        serveEngineFlags
		tf                                        upTuningFlags
	)
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Run the whole serving path on this machine",
		Long: `Starts an embedded NATS server with JetStream, one runtime worker and the OpenAI-compatible
gateway, serving the shipped default model (or --model), and prints a ready-to-paste request.

The default model is ouro-tiny-arith (3.5M parameters), taken from testdata/models in the current
directory when present and from the copy built into the binary otherwise. It is registered in the
loopserve_models KV registry as default/ouro-tiny-arith like any LoopModel.

The embedded JetStream fsyncs every write (sync_interval: always): NATS's default of flushing
every two minutes lost acknowledged messages on crashes in Jepsen's analysis of NATS 2.12.1. Run
production NATS servers with "jetstream { sync_interval: always }" too.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := ef.options(); err != nil {
				return err
			}
			tuning, err := tf.tuning()
			if err != nil {
				return err
			}
			tokens, err := readTokenFile(tokenFile)
			if err != nil {
				return err
			}
			dir, cleanup, err := resolveModel(modelDir)
			if err != nil {
				return err
			}
			defer cleanup()
			if ref == "" {
				ref = "default/" + loopModelName(dir)
			}
			r, err := bus.ParseRef(ref)
			if err != nil {
				return err
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
			return runUp(cmd.Context(), cmd.OutOrStdout(), log, upConfig{dir: dir, ref: r, listen: listen, dataDir: dataDir,
				natsPort: natsPort, tokens: tokens, engine: ef, tuning: tuning})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&modelDir, "model", "", "model directory (default: the shipped ouro-tiny-arith)")
	fl.StringVar(&ref, "loopmodel", "", "LoopModel name to register, <namespace>/<name> (default: default/<model directory name>)")
	fl.StringVar(&listen, "listen", "127.0.0.1:8080", "gateway listen address (loopback only unless you say otherwise, e.g. :8080)")
	fl.StringVar(&dataDir, "data-dir", "", "JetStream data directory (default: a temporary directory removed at exit)")
	fl.IntVar(&natsPort, "nats-port", 0, "embedded NATS port on 127.0.0.1, for external workers (0: any free port)")
	fl.StringVar(&tokenFile, "token-file", "", "file of accepted bearer tokens, one per line; empty: no authentication")
	ef.register(cmd, 0.7)
	tf.register(cmd)
	return cmd
}

// upTuningFlags set the tuning loop `up` runs on its worker, and the model's quality tiers.
type upTuningFlags struct {
	slo         time.Duration
	floor       float64
	mode        string
	interval    time.Duration
	tiers       []string // name=floor[,minDepth=N], cheapest first
	defaultTier string
}

func (f *upTuningFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.DurationVar(&f.slo, "slo-token-latency-p95", 0, "inter-token latency p95 to stay under, e.g. 50ms; with --tuning auto the exit threshold is lowered (to --min-threshold at most) to meet it")
	fl.Float64Var(&f.floor, "min-threshold", 0, "quality floor: the tuning loop never lowers the exit threshold below it (0: --threshold, never lowered)")
	fl.DurationVar(&f.interval, "tuning-interval", 10*time.Second, "time between two decisions of the tuning loop (the worker reports stats twice as often)")
	fl.StringVar(&f.mode, "tuning", "", "tuning loop: auto (applies the threshold), advisory (computes and reports only) or off (default: auto when --slo-token-latency-p95 is set, else off)")
	fl.StringArrayVar(&f.tiers, "tier", nil, "quality tier name=floor[,minDepth=N], repeatable, cheapest first: brownout lowers the first tier to its floor before the next; a floor equal to --threshold is never lowered (requests pick a tier with \"tier\" or the "+serve.HeaderTier+" header)")
	fl.StringVar(&f.defaultTier, "default-tier", "", "tier of requests that name none (required with --tier)")
}

// parseTier reads one --tier value: name=floor[,minDepth=N].
func parseTier(s string, order int) (gatepolicy.Tier, error) {
	head, opts, _ := strings.Cut(s, ",")
	name, floor, ok := strings.Cut(head, "=")
	if !ok || !bus.ValidTierName(name) {
		return gatepolicy.Tier{}, fmt.Errorf("--tier %q: want name=floor[,minDepth=N] with a DNS-label name", s)
	}
	t := gatepolicy.Tier{Name: name, BrownoutOrder: order}
	f, err := strconv.ParseFloat(floor, 64)
	if err != nil || !(f > 0 && f <= 1) {
		return gatepolicy.Tier{}, fmt.Errorf("--tier %q: floor %q must be a number in (0, 1]", s, floor)
	}
	t.Floor = f
	if opts != "" {
		key, val, ok := strings.Cut(opts, "=")
		d, err := strconv.ParseFloat(val, 64)
		if !ok || key != "minDepth" || err != nil || !(d >= 1 && d <= 64) {
			return gatepolicy.Tier{}, fmt.Errorf("--tier %q: want minDepth=N with N in [1, 64] after the floor", s)
		}
		t.MinDepth = d
	}
	return t, nil
}

// tuning checks the flags; a LocalTuning without Mode runs no loop (its tiers still route
// requests, each at the threshold).
func (f upTuningFlags) tuning() (serve.LocalTuning, error) {
	var tiers []gatepolicy.Tier
	lowest := 1.0
	for i, s := range f.tiers {
		t, err := parseTier(s, i)
		if err != nil {
			return serve.LocalTuning{}, err
		}
		tiers = append(tiers, t)
		lowest = min(lowest, t.Floor)
	}
	if (len(tiers) > 0) != (f.defaultTier != "") {
		return serve.LocalTuning{}, fmt.Errorf("--default-tier %q: give it exactly when --tier is given", f.defaultTier)
	}
	floor := f.floor
	if floor == 0 && len(tiers) > 0 {
		floor = lowest // the tiers' floors bound the model's
	}
	mode := f.mode
	if mode == "" {
		mode = serve.TuningOff
		if f.slo > 0 {
			mode = serve.TuningAuto
		}
	}
	switch mode {
	case serve.TuningOff:
		return serve.LocalTuning{Spec: gatepolicy.Spec{Tiers: tiers, DefaultTier: f.defaultTier}}, nil
	case serve.TuningAuto, serve.TuningAdvisory:
	default:
		return serve.LocalTuning{}, fmt.Errorf("--tuning %q: want auto, advisory or off", f.mode)
	}
	if f.slo < 0 || !(f.floor >= 0 && f.floor <= 1) || f.interval < 0 {
		return serve.LocalTuning{}, fmt.Errorf("--slo-token-latency-p95 %v must not be negative and --min-threshold %v must lie in [0, 1], --tuning-interval %v must not be negative", f.slo, f.floor, f.interval)
	}
	return serve.LocalTuning{Mode: mode, Spec: gatepolicy.Spec{TokenLatencyP95: f.slo, Floor: floor, Tiers: tiers, DefaultTier: f.defaultTier},
		Interval: f.interval}, nil
}

type upConfig struct {
	dir      string
	ref      bus.Ref
	listen   string
	dataDir  string
	natsPort int
	tokens   []string
	engine   serveEngineFlags
	tuning   serve.LocalTuning
}

// runUp serves until ctx ends.
func runUp(ctx context.Context, out io.Writer, log *slog.Logger, c upConfig) error {
	_, local, stop, err := startUp(ctx, log, c)
	if err != nil {
		return err
	}
	url := strings.Replace(local.URL(), "[::]", "localhost", 1)
	fmt.Fprintf(out, "loopserve is serving %s at %s (NATS %s)\n\n", c.ref, url, local.Server.ClientURL())
	fmt.Fprintf(out, "curl -s %s/v1/completions -H 'Content-Type: application/json' \\\n  -d '{\"model\": \"%s\", \"prompt\": \"a = 2 ; n = a + 7 ; b = 0 ; ? n =\", \"max_tokens\": 4}'\n\n", url, c.ref)
	fmt.Fprintln(out, "Press Ctrl-C to stop.")
	<-ctx.Done()
	fmt.Fprintln(out, "stopping")
	return stop()
}

// startUp loads the model, starts its engine and the local deployment; stop undoes both.
func startUp(ctx context.Context, log *slog.Logger, c upConfig) (*serve.Loaded, *serve.Local, func() error, error) {
	opts, err := c.engine.options()
	if err != nil {
		return nil, nil, nil, err
	}
	pr := progress.New(os.Stderr, "loading "+c.dir, 64<<20)
	l, err := serve.LoadProgress(c.dir, opts, func(p model.Progress) { pr.Update(p.Done, p.Total) })
	if err != nil {
		return nil, nil, nil, err
	}
	pr.Done()
	stopEngine := runEngine(l)
	wo := l.Worker
	wo.Capacity = c.engine.capacity
	wo.Logger = log
	if c.tuning.Mode != "" && c.tuning.Interval > 0 {
		wo.StatsInterval = max(c.tuning.Interval/2, 50*time.Millisecond)
	}
	local, err := serve.StartLocal(ctx, serve.LocalOptions{Ref: c.ref, DataDir: c.dataDir, NATSPort: c.natsPort, Listen: c.listen,
		Gen: l.Engine, Tok: l.Tok, Worker: wo, Gateway: serve.GatewayOptions{Tokens: c.tokens, Logger: log}, Tuning: c.tuning})
	if err != nil {
		return nil, nil, nil, errors.Join(err, stopEngine())
	}
	return l, local, func() error { return errors.Join(local.Close(), stopEngine()) }, nil
}

// resolveModel picks the model directory: the flag, else testdata/models/ouro-tiny-arith under the
// working directory, else the embedded copy extracted to a temporary directory.
func resolveModel(flag string) (dir string, cleanup func(), err error) {
	if flag != "" {
		return flag, func() {}, nil
	}
	local := filepath.Join("testdata", "models", defaultmodel.Name)
	if _, err := os.Stat(filepath.Join(local, "config.json")); err == nil {
		return local, func() {}, nil
	}
	tmp, err := os.MkdirTemp("", "loopserve-model-")
	if err != nil {
		return "", nil, fmt.Errorf("extracting the default model: %w", err)
	}
	dir = filepath.Join(tmp, defaultmodel.Name)
	if err := defaultmodel.Extract(dir); err != nil {
		_ = os.RemoveAll(tmp)
		return "", nil, err
	}
	return dir, func() { _ = os.RemoveAll(tmp) }, nil
}

// loopModelName turns a model directory into a DNS label for the LoopModel name.
func loopModelName(dir string) string {
	base := strings.ToLower(filepath.Base(filepath.Clean(dir)))
	var b strings.Builder
	for _, r := range base {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	s := strings.Trim(b.String(), "-")
	if len(s) > 63 {
		s = strings.Trim(s[:63], "-")
	}
	if s == "" {
		return defaultmodel.Name
	}
	return s
}
