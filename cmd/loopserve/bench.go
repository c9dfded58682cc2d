package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/bench"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

func newBenchCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure runtime and serving speed against their peers",
		Long: `Benchmarks the runtime (decode and prefill tokens/s, memory bandwidth fraction, a PyTorch peer)
and the serving path (requests/s, TTFT, inter-token latency) side by side, reporting ratios.`,
		Args: cobra.NoArgs,
	}
	cmd.AddCommand(newBenchRuntimeCmd())
	cmd.AddCommand(newBenchServeCmd())
	cmd.AddCommand(newBenchChaosCmd())
	cmd.AddCommand(newBenchTunerCmd())
	cmd.AddCommand(newBenchMkmodelCmd())
	return cmd
}

// runtimeReport is `bench runtime --json`: one object. Peer fields are null without --peer.
type runtimeReport struct {
	Model              string  `json:"model"`
	Params             int64   `json:"params"`
	LoopSteps          int     `json:"loop_steps"`
	Threads            int     `json:"threads"`
	Rounds             int     `json:"rounds"`
	LoadAverage        string  `json:"load_average,omitempty"` // /proc/loadavg before the run: other work skews figures
	PrefillTokens      int     `json:"prefill_tokens"`
	DecodeTokens       int     `json:"decode_tokens"`
	Batch              int     `json:"batch"`
	PrefillTokS        float64 `json:"prefill_tok_s"`
	DecodeTokSB1       float64 `json:"decode_tok_s_b1"`
	DecodeTokSB8       float64 `json:"decode_tok_s_b8"` // at --batch sequences (8 by default)
	LoopStepsPerToken  float64 `json:"loop_steps_per_token"`
	WeightBytesPerTok  int64   `json:"weight_bytes_per_token"`
	BandwidthGBs       float64 `json:"bandwidth_gb_s"`
	BandwidthFractionB float64 `json:"bandwidth_fraction_b1"`
	// BandwidthFractionPaired is the median over every round's batch-1 tokens of each token's
	// weight bytes per second over the bandwidth measured just before and after it
	// (bench.PairedDecode); BandwidthFractionB compares the best decode rate of the run with its
	// best bandwidth pass, moments that may lie seconds apart.
	BandwidthFractionPaired float64 `json:"bandwidth_fraction_b1_paired"`
	PairedTokens            int     `json:"bandwidth_fraction_b1_paired_tokens"`
	// LastLevelCache is the largest CPU cache: a model whose per-step weights fit in it is not
	// bound by memory bandwidth, and bandwidth_fraction_b1 can exceed 1.
	LastLevelCache int64 `json:"last_level_cache_bytes,omitempty"`

	PeerDtype        string   `json:"peer_dtype,omitempty"`
	PeerTorch        string   `json:"peer_torch,omitempty"`
	PeerOMPWait      string   `json:"peer_omp_wait_policy,omitempty"`
	PeerPrefillTokS  *float64 `json:"peer_prefill_tok_s"`
	PeerDecodeTokSB1 *float64 `json:"peer_decode_tok_s_b1"`
	PeerDecodeTokSB8 *float64 `json:"peer_decode_tok_s_b8"`
	RatioPrefill     *float64 `json:"ratio_prefill"`   // ours / peer
	RatioDecodeB1    *float64 `json:"ratio_decode_b1"` // ours / peer
	RatioDecodeB8    *float64 `json:"ratio_decode_b8"` // ours / peer

	// Adaptive depth (--threshold τ > 0; null with 0): the engine decodes the same prompts
	// again with per-token early exit at τ, a different computation from the full-depth
	// figures above and the peer's (its tokens may differ), measured the same way.
	Threshold             float64  `json:"threshold"`
	DecodeTokSB1Adaptive  *float64 `json:"decode_tok_s_b1_adaptive"`
	DecodeTokSB8Adaptive  *float64 `json:"decode_tok_s_b8_adaptive"` // at --batch sequences
	MeanDepthAdaptive     *float64 `json:"mean_depth_adaptive"`      // loop steps per decoded token at batch 1
	RatioDecodeB1Adaptive *float64 `json:"ratio_decode_b1_adaptive"` // adaptive ours / peer at full depth

	// Numerics is the CPU arithmetic of the figures above (the first of --numerics); Engines
	// holds every --numerics' full-depth figures, the first included.
	Numerics string          `json:"numerics"`
	Engines  []engineFigures `json:"engines"`
	// Baseline is another loopserve binary (--baseline, e.g. the build before a change) run in
	// the same rounds with the same prompts; null without --baseline.
	Baseline *engineFigures `json:"baseline"`
	// Own are this binary's figures, per --numerics, run the way Baseline is (its own process,
	// every round): the ratios to the baseline are theirs. A fresh process faults in its heap
	// as it first allocates (KV blocks, scratch), which a process that already ran an engine
	// reuses: the same binary measured in this process beats itself in its own process by up to
	// 1.7× at prefill, so in-process figures are compared with the baseline's only through these.
	Own []engineFigures `json:"own_process,omitempty"`
}

// engineFigures are one engine's full-depth rates, with ratios to the peer and the baseline
// (null where those did not run).
type engineFigures struct {
	Name              string  `json:"name"` // numerics, or the baseline binary
	PrefillTokS       float64 `json:"prefill_tok_s"`
	DecodeTokSB1      float64 `json:"decode_tok_s_b1"`
	DecodeTokSB8      float64 `json:"decode_tok_s_b8"`
	BandwidthFraction float64 `json:"bandwidth_fraction_b1"`
	// BandwidthPaired is runtimeReport.BandwidthFractionPaired for this engine (0 for the
	// baseline and the own-process runs, and with --paired=false).
	BandwidthPaired float64  `json:"bandwidth_fraction_b1_paired"`
	PeerPrefill     *float64 `json:"ratio_prefill"`
	PeerDecodeB1    *float64 `json:"ratio_decode_b1"`
	PeerDecodeB8    *float64 `json:"ratio_decode_b8"`
	BasePrefill     *float64 `json:"baseline_ratio_prefill"`
	BaseDecodeB1    *float64 `json:"baseline_ratio_decode_b1"`
	BaseDecodeB8    *float64 `json:"baseline_ratio_decode_b8"`
}

func newBenchRuntimeCmd() *cobra.Command {
	var (
		modelDir, peerScript, python, peerDtype, baseline string
		asJSON, withPeer, withPaired                      bool
		opts                                              bench.RuntimeOptions
		bwMiB, bwPasses, rounds                           int
		bf                                                backendFlags
	)
	cmd := &cobra.Command{
		Use:   "runtime",
		Short: "Decode and prefill tokens/s of the CPU engine, its memory-bandwidth fraction, and a PyTorch peer",
		Long: `Loads the model with the CPU engine and measures prefill tokens/s (one --prefill-token prompt)
and full-depth greedy decode tokens/s at batch 1 and at --batch sequences, after measuring this
machine's memory bandwidth (all cores streaming a large buffer, best of --bandwidth-passes
before the engine runs and as many after). With --rounds N the engine and the peer alternate N
times and each figure's best counts: the host's memory bandwidth and free cores swing by 2× within
seconds on shared machines.
bandwidth_fraction_b1 = weight bytes read per decoded token (every layer once per loop step, the
LM head once) × decode tokens/s at batch 1 / bandwidth. bandwidth_fraction_b1_paired pairs each
batch-1 token with the bandwidth of its own moment: after the batch-1 figure the engine decodes
the prompt again, and after each token (the engine paused) the bandwidth buffer streams as many
bytes as a token reads; each token's rate over the mean of the passes just before and after it,
median over every round's tokens (--paired=false skips it).

--numerics exact,bf16 measures the engine once per CPU arithmetic in each round (the first's
figures fill the main table; every one is listed after it). --baseline BINARY also runs another
loopserve binary's "bench runtime --json" in each round with the same prompts (e.g. the build
of the commit before a change), and this binary the same way (its own process, once per
--numerics), and prints the latter's rates over the former's: a fresh process pays page faults
that one which already ran an engine does not, so in-process figures are not compared with it.

With --threshold τ > 0 (0.5 by default) the engine also decodes the same prompts at batch 1 and
at --batch sequences with per-token early exit at τ (Fast mode: a token that exits at loop step
d costs d steps) and reports those rates, their mean depth, and the batch-1 rate over the
peer's full-depth one. That is a different computation from the peer's (which, like the
reference code, runs every loop step for every token); the tokens may differ.

With --peer (the default) it then runs the PyTorch eager peer (hack/peer/ouro.py, Debian's
python3-torch) on the same weights and prompts and prints our/peer ratios. Targets on the
1.4B shape: decode at batch 1 ≥ 80% of the bandwidth, decode at batch 8 ≥ 2.5× the peer,
prefill ≥ 1.2× the peer.

A 1.4B-shaped model: go run ./hack/mkmodel (writes ~/.cache/loopserve/models/ouro-1.4b-random).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			out := cmd.OutOrStdout()
			progress := io.Discard
			if !asJSON {
				progress = cmd.ErrOrStderr()
			}
			threads := bf.threads
			peer := bench.Peer{Python: python, Script: peerScript, Dtype: peerDtype, Threads: threads}
			var backends []engine.Backend
			var names []string
			for _, n := range strings.Split(bf.numerics, ",") {
				b := bf
				b.numerics = strings.TrimSpace(n)
				be, err := b.backend()
				if err != nil {
					return err
				}
				backends, names = append(backends, be), append(names, b.numerics)
			}
			if baseline != "" {
				if _, err := os.Stat(baseline); err != nil {
					return fmt.Errorf("--baseline: %w", err)
				}
			}
			if withPeer {
				if err := peer.Available(ctx); err != nil {
					return fmt.Errorf("peer (run with --peer=false to skip it): %w", err)
				}
			}
			if rounds < 1 {
				return fmt.Errorf("--rounds %d: at least 1", rounds)
			}
			if opts.Threshold < 0 || opts.Threshold > 1 || math.IsNaN(opts.Threshold) {
				return fmt.Errorf("--threshold %g: not in [0, 1]", opts.Threshold)
			}
			rep := runtimeReport{Model: modelDir, Threads: runtime.GOMAXPROCS(0), Rounds: rounds, Threshold: opts.Threshold, Numerics: names[0]}
			rep.Engines = make([]engineFigures, len(names))
			for i, n := range names {
				rep.Engines[i].Name = n
			}
			var b1Adaptive, b8Adaptive, depthAdaptive float64
			if threads > 0 {
				rep.Threads = threads
			}
			if b, err := os.ReadFile("/proc/loadavg"); err == nil {
				rep.LoadAverage = strings.Join(strings.Fields(string(b))[:3], " ")
			}

			rep.LastLevelCache = bench.LastLevelCache()
			fmt.Fprintf(progress, "loading %s…\n", modelDir)
			m, err := model.Load(modelDir)
			if err != nil {
				return err
			}
			defer m.Close()
			rep.Params = params(m)
			rep.LoopSteps = m.Config.TotalUTSteps
			prefill, prompts := opts.Prompts(m.Config.VocabSize)
			probe, err := bench.NewProbe(int64(bwMiB) << 20)
			if err != nil {
				return err
			}
			if withPaired {
				opts.Probe = probe
			}
			var self string // this binary, for the own-process runs beside --baseline
			if baseline != "" {
				if self, err = os.Executable(); err != nil {
					return fmt.Errorf("--baseline: this binary: %w", err)
				}
			}
			paired := make([][]float64, len(backends)) // [engine][tokens of every round]
			var pr *bench.PeerResult
			// Rounds alternate the engine and the peer and keep each figure's best, so that
			// neither side is measured only in a moment when other work holds the machine.
			for round := range rounds {
				// Bandwidth before and after the engine: the best of both is closer to the
				// limit than either on a shared machine.
				for _, when := range []string{"before", "after"} {
					for i, be := range backends {
						if when != "after" {
							break
						}
						fmt.Fprintf(progress, "round %d/%d: running the engine (%s numerics)…\n", round+1, rounds, names[i])
						o := opts
						if i > 0 {
							o.Threshold = 0 // adaptive figures for the first numerics only
						}
						res, err := bench.Runtime(ctx, m, be, o)
						if err != nil {
							return err
						}
						ef := &rep.Engines[i]
						ef.PrefillTokS = max(ef.PrefillTokS, res.PrefillTokS)
						ef.DecodeTokSB1 = max(ef.DecodeTokSB1, res.DecodeTokSB1)
						ef.DecodeTokSB8 = max(ef.DecodeTokSB8, res.DecodeTokSBN)
						paired[i] = append(paired[i], res.PairedFractions...)
						if i > 0 {
							continue
						}
						rep.PrefillTokens, rep.DecodeTokens, rep.Batch = res.PrefillTokens, res.DecodeTokens, res.Batch
						rep.PrefillTokS = max(rep.PrefillTokS, res.PrefillTokS)
						rep.DecodeTokSB1 = max(rep.DecodeTokSB1, res.DecodeTokSB1)
						rep.DecodeTokSB8 = max(rep.DecodeTokSB8, res.DecodeTokSBN)
						rep.LoopStepsPerToken = res.LoopStepsPerTok
						rep.WeightBytesPerTok = res.WeightBytesPerTk
						b1Adaptive = max(b1Adaptive, res.DecodeTokSB1Adaptive)
						b8Adaptive = max(b8Adaptive, res.DecodeTokSBNAdaptive)
						depthAdaptive = res.MeanDepthAdaptive // greedy: the same tokens every round
					}
					fmt.Fprintf(progress, "round %d/%d: measuring memory bandwidth (%d MiB, %d passes)…\n", round+1, rounds, bwMiB, bwPasses)
					bw, err := probe.Measure(ctx, bwPasses)
					if err != nil {
						return err
					}
					rep.BandwidthGBs = max(rep.BandwidthGBs, bw.GBPerSec())
				}
				if baseline != "" {
					fmt.Fprintf(progress, "round %d/%d: running the baseline %s…\n", round+1, rounds, baseline)
					f, err := runBaseline(ctx, baseline, modelDir, opts, threads)
					if err != nil {
						return err
					}
					if rep.Baseline == nil {
						rep.Baseline = &f
					} else {
						rep.Baseline.keepBest(f)
					}
					if rep.Own == nil {
						rep.Own = make([]engineFigures, len(names))
					}
					for i, n := range names {
						fmt.Fprintf(progress, "round %d/%d: running this binary in its own process (%s numerics)…\n", round+1, rounds, n)
						f, err := runBaseline(ctx, self, modelDir, opts, threads, "--numerics", n, "--paired=false")
						if err != nil {
							return err
						}
						f.Name = n + " (own process)"
						rep.Own[i].keepBest(f)
					}
				}
				if withPeer {
					fmt.Fprintf(progress, "round %d/%d: running the PyTorch peer…\n", round+1, rounds)
					r, err := peer.Bench(ctx, modelDir, bench.PeerSpec{PrefillPrompt: prefill, DecodePrompts: prompts,
						DecodeTokens: rep.DecodeTokens + 1, Repeats: max(opts.Repeats, 1)})
					if err != nil {
						return err
					}
					if pr == nil {
						pr = &r
					} else {
						pr.PrefillTokS = max(pr.PrefillTokS, r.PrefillTokS)
						pr.DecodeTokSB1 = max(pr.DecodeTokSB1, r.DecodeTokSB1)
						pr.DecodeTokSBN = max(pr.DecodeTokSBN, r.DecodeTokSBN)
					}
				}
			}
			if rep.BandwidthGBs > 0 {
				rep.BandwidthFractionB = float64(rep.WeightBytesPerTok) * rep.DecodeTokSB1 / (rep.BandwidthGBs * 1e9)
			}
			for i := range rep.Engines {
				rep.Engines[i].BandwidthPaired = bench.Median(paired[i])
			}
			rep.BandwidthFractionPaired, rep.PairedTokens = rep.Engines[0].BandwidthPaired, len(paired[0])
			figs := append([]*engineFigures{}, rep.Baseline)
			for i := range rep.Engines {
				figs = append(figs, &rep.Engines[i])
			}
			for i := range rep.Own {
				figs = append(figs, &rep.Own[i])
				if b := rep.Baseline; b != nil {
					f := &rep.Own[i]
					f.BasePrefill, f.BaseDecodeB1, f.BaseDecodeB8 = ratio(f.PrefillTokS, b.PrefillTokS), ratio(f.DecodeTokSB1, b.DecodeTokSB1), ratio(f.DecodeTokSB8, b.DecodeTokSB8)
				}
			}
			for _, f := range figs {
				if f == nil {
					continue
				}
				if rep.BandwidthGBs > 0 {
					f.BandwidthFraction = float64(rep.WeightBytesPerTok) * f.DecodeTokSB1 / (rep.BandwidthGBs * 1e9)
				}
				if pr != nil {
					f.PeerPrefill, f.PeerDecodeB1, f.PeerDecodeB8 = ratio(f.PrefillTokS, pr.PrefillTokS), ratio(f.DecodeTokSB1, pr.DecodeTokSB1), ratio(f.DecodeTokSB8, pr.DecodeTokSBN)
				}
			}
			if opts.Threshold > 0 {
				rep.DecodeTokSB1Adaptive, rep.DecodeTokSB8Adaptive, rep.MeanDepthAdaptive = &b1Adaptive, &b8Adaptive, &depthAdaptive
			}
			if pr != nil {
				rep.PeerDtype, rep.PeerTorch, rep.PeerOMPWait = pr.Dtype, pr.Torch, pr.OMPWaitPolicy
				rep.PeerPrefillTokS, rep.PeerDecodeTokSB1, rep.PeerDecodeTokSB8 = &pr.PrefillTokS, &pr.DecodeTokSB1, &pr.DecodeTokSBN
				rep.RatioPrefill = ratio(rep.PrefillTokS, pr.PrefillTokS)
				rep.RatioDecodeB1 = ratio(rep.DecodeTokSB1, pr.DecodeTokSB1)
				rep.RatioDecodeB8 = ratio(rep.DecodeTokSB8, pr.DecodeTokSBN)
				if opts.Threshold > 0 {
					rep.RatioDecodeB1Adaptive = ratio(b1Adaptive, pr.DecodeTokSB1)
				}
			}
			if asJSON {
				enc := json.NewEncoder(out)
				return enc.Encode(rep)
			}
			return printRuntimeReport(out, rep)
		},
	}
	f := cmd.Flags()
	f.StringVar(&modelDir, "model", "testdata/models/ouro-tiny-arith", "model folder (config.json + safetensors)")
	f.BoolVar(&asJSON, "json", false, "print one JSON object")
	f.BoolVar(&withPeer, "peer", true, "run the PyTorch peer side by side")
	f.StringVar(&peerScript, "peer-script", "hack/peer/ouro.py", "the peer's script")
	f.StringVar(&python, "python", "/usr/bin/python3", "the peer's interpreter (needs torch)")
	f.StringVar(&peerDtype, "peer-dtype", "bfloat16", "the peer's compute dtype: bfloat16 (the weights' own, fastest here) or float32")
	f.IntVar(&opts.PrefillLen, "prefill", 128, "prompt tokens timed for prefill")
	f.IntVar(&opts.PromptLen, "prompt", 16, "prompt tokens of each decoding sequence")
	f.IntVar(&opts.DecodeTokens, "tokens", 32, "tokens generated per sequence (the first, from prefill, is not timed)")
	f.IntVar(&opts.Batch, "batch", 8, "sequences decoding together for the batched figure")
	f.IntVar(&opts.Repeats, "repeats", 1, "best of this many runs of each measurement")
	f.Uint64Var(&opts.Seed, "seed", 1, "prompt seed")
	f.Float64Var(&opts.Threshold, "threshold", 0.5, "exit threshold τ of the adaptive-depth decode figures (early exit, unlike the peer); 0 skips them")
	f.IntVar(&bwMiB, "bandwidth-mib", 2048, "bandwidth buffer size in MiB (far above the last-level cache)")
	f.IntVar(&bwPasses, "bandwidth-passes", 5, "bandwidth passes before and again after the engine (best one counts)")
	f.BoolVar(&withPaired, "paired", true, "also decode at batch 1 with the bandwidth measured after every token (bandwidth_fraction_b1_paired)")
	f.IntVar(&rounds, "rounds", 1, "rounds alternating engine and peer; each figure's best counts")
	f.StringVar(&baseline, "baseline", "", "another loopserve binary to run side by side in every round (e.g. the build before a change)")
	bf.register(cmd)
	f.Lookup("threads").Usage = "engine and peer threads (0: GOMAXPROCS / every core)"
	f.Lookup("numerics").Usage = "CPU arithmetic of the engine runs, comma-separated: exact, bf16 (e.g. exact,bf16 measures both)"
	return cmd
}

// runBaseline runs a loopserve binary's bench runtime in its own process (engine only, full
// depth) with the same options and the extra flags (which the binary must know: the baseline
// gets none) and returns its rates.
func runBaseline(ctx context.Context, bin, modelDir string, o bench.RuntimeOptions, threads int, extra ...string) (engineFigures, error) {
	args := []string{"bench", "runtime", "--json", "--peer=false", "--threshold", "0", "--model", modelDir,
		"--prefill", fmt.Sprint(o.PrefillLen), "--prompt", fmt.Sprint(o.PromptLen), "--tokens", fmt.Sprint(o.DecodeTokens),
		"--batch", fmt.Sprint(o.Batch), "--repeats", fmt.Sprint(max(o.Repeats, 1)), "--seed", fmt.Sprint(max(o.Seed, 1)),
		"--bandwidth-mib", "16", "--bandwidth-passes", "1", "--threads", fmt.Sprint(threads)}
	args = append(args, extra...)
	var stderr bytes.Buffer
	c := exec.CommandContext(ctx, bin, args...)
	c.Stderr = &stderr
	out, err := c.Output()
	if err != nil {
		return engineFigures{}, fmt.Errorf("baseline %s: %w: %s", bin, err, strings.TrimSpace(stderr.String()))
	}
	var r struct {
		PrefillTokS  float64 `json:"prefill_tok_s"`
		DecodeTokSB1 float64 `json:"decode_tok_s_b1"`
		DecodeTokSB8 float64 `json:"decode_tok_s_b8"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return engineFigures{}, fmt.Errorf("baseline %s: output is not its bench JSON: %w", bin, err)
	}
	return engineFigures{Name: bin, PrefillTokS: r.PrefillTokS, DecodeTokSB1: r.DecodeTokSB1, DecodeTokSB8: r.DecodeTokSB8}, nil
}

// keepBest keeps the best of f's rates and g's, and g's name where f has none.
func (f *engineFigures) keepBest(g engineFigures) {
	f.Name = cmp.Or(f.Name, g.Name)
	f.PrefillTokS = max(f.PrefillTokS, g.PrefillTokS)
	f.DecodeTokSB1 = max(f.DecodeTokSB1, g.DecodeTokSB1)
	f.DecodeTokSB8 = max(f.DecodeTokSB8, g.DecodeTokSB8)
}

func params(m *model.Model) int64 {
	n := int64(len(m.Norm) + len(m.ExitW) + 1)
	mat := func(w *model.Matrix) int64 { return int64(w.Rows) * int64(w.Cols) }
	n += mat(&m.Embed)
	if !m.Config.TieWordEmbeddings {
		n += mat(&m.LMHead)
	}
	for i := range m.Layers {
		L := &m.Layers[i]
		n += int64(len(L.InputNorm) + len(L.InputNorm2) + len(L.PostAttnNorm) + len(L.PostAttnNorm2))
		for _, w := range []*model.Matrix{&L.Q, &L.K, &L.V, &L.O, &L.Gate, &L.Up, &L.Down} {
			n += mat(w)
		}
	}
	return n
}

// rate formats tokens/s with three significant digits, without exponents.
func rate(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	case v >= 1:
		return fmt.Sprintf("%.2f", v)
	}
	return fmt.Sprintf("%.3g", v)
}

func ratio(ours, peer float64) *float64 {
	if peer <= 0 {
		return nil
	}
	r := ours / peer
	return &r
}

func printRuntimeReport(w io.Writer, r runtimeReport) error {
	fmt.Fprintf(w, "model %s: %.3gB params, %d loop steps; %d threads; load average %s\n",
		r.Model, float64(r.Params)/1e9, r.LoopSteps, r.Threads, r.LoadAverage)
	fmt.Fprintf(w, "memory bandwidth %.1f GB/s; %.3g GB of weights per decoded token (full depth)\n",
		r.BandwidthGBs, float64(r.WeightBytesPerTok)/1e9)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	peerHead := "peer"
	if r.PeerTorch != "" {
		peerHead = fmt.Sprintf("peer (torch %s %s, best of OMP_WAIT_POLICY %s)", r.PeerTorch, r.PeerDtype, r.PeerOMPWait)
	}
	fmt.Fprintf(tw, "\tloopserve\t%s\tratio\ttarget\n", peerHead)
	row := func(name string, ours float64, peer, ratio *float64, target string) {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", name, cells(ours, peer, ratio), target)
	}
	row(fmt.Sprintf("prefill tok/s (%d-token prompt)", r.PrefillTokens), r.PrefillTokS, r.PeerPrefillTokS, r.RatioPrefill, "≥ 1.2×")
	row("decode tok/s, batch 1", r.DecodeTokSB1, r.PeerDecodeTokSB1, r.RatioDecodeB1, "")
	row(fmt.Sprintf("decode tok/s, batch %d", r.Batch), r.DecodeTokSB8, r.PeerDecodeTokSB8, r.RatioDecodeB8, "≥ 2.5×")
	if err := tw.Flush(); err != nil {
		return err
	}
	if _, err := fmt.Fprintf(w, "decode at batch 1 reads %.1f GB/s of weights: %.0f%% of the memory bandwidth (target ≥ 80%%); mean depth %.2f; %s numerics\n",
		float64(r.WeightBytesPerTok)*r.DecodeTokSB1/1e9, 100*r.BandwidthFractionB, r.LoopStepsPerToken, cmp.Or(r.Numerics, "exact")); err != nil {
		return err
	}
	if r.PairedTokens > 0 {
		if _, err := fmt.Fprintf(w, "paired with the bandwidth measured just before and after each batch-1 token: %.0f%% (median of %d tokens)\n",
			100*r.BandwidthFractionPaired, r.PairedTokens); err != nil {
			return err
		}
	}
	if len(r.Engines) > 1 || r.Baseline != nil {
		if err := printEngines(w, r); err != nil {
			return err
		}
	}
	if r.DecodeTokSB1Adaptive != nil {
		if err := printAdaptive(w, r); err != nil {
			return err
		}
	}
	if steps := max(r.LoopSteps, 1); r.LastLevelCache > 0 && r.WeightBytesPerTok/int64(steps) < r.LastLevelCache {
		_, err := fmt.Fprintf(w, "note: one loop step's weights (%.3g MB) fit in the %.3g MB last-level cache, so decode is not bound by memory bandwidth here\n",
			float64(r.WeightBytesPerTok)/float64(steps)/1e6, float64(r.LastLevelCache)/1e6)
		return err
	}
	return nil
}

// printEngines lists every numerics' figures and the baseline's, with their ratios.
func printEngines(w io.Writer, r runtimeReport) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "engine\tprefill tok/s\tdecode b1\tdecode b%d\tb1 bandwidth (best, paired)\tvs peer (prefill, b1, b%d)\tvs baseline (prefill, b1, b%d)\n", r.Batch, r.Batch, r.Batch)
	x := func(v *float64) string {
		if v == nil {
			return "-"
		}
		return fmt.Sprintf("%.2f×", *v)
	}
	all := append(append([]engineFigures{}, r.Engines...), r.Own...)
	if r.Baseline != nil {
		b := *r.Baseline
		b.Name = "baseline " + b.Name
		all = append(all, b)
	}
	for _, f := range all {
		p := "-"
		if f.BandwidthPaired > 0 {
			p = fmt.Sprintf("%.0f%%", 100*f.BandwidthPaired)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.0f%% %s\t%s %s %s\t%s %s %s\n", f.Name, rate(f.PrefillTokS), rate(f.DecodeTokSB1), rate(f.DecodeTokSB8),
			100*f.BandwidthFraction, p, x(f.PeerPrefill), x(f.PeerDecodeB1), x(f.PeerDecodeB8), x(f.BasePrefill), x(f.BaseDecodeB1), x(f.BaseDecodeB8))
	}
	return tw.Flush()
}

// printAdaptive prints the early-exit figures apart from the full-depth table, so that the
// ratio is not read as like for like.
func printAdaptive(w io.Writer, r runtimeReport) error {
	if _, err := fmt.Fprintf(w, "adaptive depth (early exit at τ %g, mean depth %.2f of %d loop steps; a different computation from the peer's full depth, tokens may differ):\n",
		r.Threshold, *r.MeanDepthAdaptive, r.LoopSteps); err != nil {
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "\tloopserve adaptive\tpeer full depth\tratio\n")
	fmt.Fprintf(tw, "decode tok/s, batch 1\t%s\n", cells(*r.DecodeTokSB1Adaptive, r.PeerDecodeTokSB1, r.RatioDecodeB1Adaptive))
	fmt.Fprintf(tw, "decode tok/s, batch %d\t%s\n", r.Batch, cells(*r.DecodeTokSB8Adaptive, nil, nil))
	return tw.Flush()
}

// cells are a table row's "ours, peer, ratio" columns, tab-separated; "-" where peer or ratio is nil.
func cells(ours float64, peer, ratio *float64) string {
	p, q := "-", "-"
	if peer != nil {
		p = rate(*peer)
	}
	if ratio != nil {
		q = fmt.Sprintf("%.2f×", *ratio)
	}
	return rate(ours) + "\t" + p + "\t" + q
}
