package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/bench"
	"github.com/loopserve/loopserve/gatepolicy/sim"
	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

func newBenchTunerCmd() *cobra.Command {
	var (
		traceFile, plotFile string
		shape               string
		seed                uint64
		asJSON, measure     bool
		modelDir            string
	)
	cmd := &cobra.Command{
		Use:   "tuner",
		Short: "Compare autoscaling policies with the adaptive-depth tuner on a simulated trace",
		Long: `Simulates a LoopModel under a request-rate trace: replicas with a 60 s cold start, step-level
batching (one iteration runs one loop step of every running request; its cost and the per-token
depth come from ouro-tiny-arith measured on the engine, gatepolicy/sim/profile.json;
--measure-cost measures the cost on this machine first and scales the default trace's rates
by the speed ratio), and five
policies with the same SLO (ITL p95 8 ms, TTFT 1 s, minAgreement 0.85, τ 0.9 with floor 0.5,
1-40 replicas, decisions every 2 s): static (fixed fleet for the mean load),
replica_only_requests (in-flight requests or requests/s per replica, as KubeAI/KServe),
replica_only_saturation (slot and queue headroom, as llm-d), threshold_only (fixed fleet, τ
tuned by gatepolicy) and joint (gatepolicy.Tuner, the operator's code, with a 30 s scale-up
delay). Each replica-only baseline is swept over its settings and decision interval (2, 5,
15 s) and reports its cheapest run with 99% ITL and TTFT attainment.

The default trace is a seeded diurnal cycle with bursts (--shape picks a step load, a ramp or
a bursty hour instead); --trace replays a CSV of t_seconds,requests_per_second rows
(piecewise constant, starting at 0).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			sh, ok := sim.Shapes[shape]
			if !ok {
				return fmt.Errorf("--shape %q: want one of %s", shape, strings.Join(sim.ShapeNames, ", "))
			}
			tr := sim.Synthetic(sh, seed)
			if traceFile != "" {
				f, err := os.Open(traceFile)
				if err != nil {
					return err
				}
				defer f.Close()
				if tr, err = sim.ParseTrace(f); err != nil {
					return fmt.Errorf("reading %s: %w", traceFile, err)
				}
			}
			prof := sim.DefaultProfile()
			if measure {
				dir, cleanup, err := resolveModel(modelDir)
				if err != nil {
					return err
				}
				defer cleanup()
				m, err := model.Load(dir)
				if err != nil {
					return fmt.Errorf("loading %s: %w", dir, err)
				}
				defer m.Close()
				if prof.StepBase, prof.StepPerRow, err = bench.StepCost(cmd.Context(), m, func() engine.Backend { return cpu.New(1) }); err != nil {
					return err
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "step cost measured here: %.1f µs + %.1f µs per row\n", prof.StepBase*1e6, prof.StepPerRow*1e6)
				if traceFile == "" {
					// the default trace keeps its fleet sizes: its rates scale with this machine's speed
					k := sim.DefaultProfile().StepPerRow / prof.StepPerRow
					for i := range tr.Rate {
						tr.Rate[i] *= k
					}
					fmt.Fprintf(cmd.ErrOrStderr(), "default trace rates scaled by %.3f to this machine's speed\n", k)
				}
			}
			c := sim.DefaultConfig(prof, tr, seed)
			rep, err := sim.Compare(c)
			if err != nil {
				return err
			}
			if plotFile != "" {
				f, err := os.Create(plotFile)
				if err != nil {
					return err
				}
				if err := sim.WriteSVG(f, rep.Policies["joint"], c); err != nil {
					f.Close()
					return err
				}
				if err := f.Close(); err != nil {
					return err
				}
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				return enc.Encode(rep.Policies)
			}
			w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "policy\tITL attainment\tTTFT attainment\tagreement\treplica-seconds\tscale events\tsetting")
			for _, n := range sim.Names {
				r := rep.Policies[n]
				fmt.Fprintf(w, "%s\t%.2f%%\t%.2f%%\t%.4f\t%.0f\t%d\t%s\n", n, 100*r.Attainment, 100*r.TTFTAttainment, r.Agreement, r.ReplicaSeconds, r.ScaleEvents, r.Setting)
			}
			if err := w.Flush(); err != nil {
				return err
			}
			j := rep.Policies["joint"]
			if riv, ok := rep.Rival(j); ok {
				fmt.Fprintf(out, "joint uses %.0f%% fewer replica-seconds than the cheapest replica-only run at equal or better attainment (%s, %s)\n", 100*(1-j.ReplicaSeconds/riv.ReplicaSeconds), riv.Policy, riv.Setting)
			} else {
				fmt.Fprintln(out, "no replica-only setting reaches joint's ITL and TTFT attainment")
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&traceFile, "trace", "", "CSV trace of t_seconds,requests_per_second (default: the seeded synthetic trace of --shape)")
	fl.StringVar(&shape, "shape", "diurnal", "synthetic trace shape: "+strings.Join(sim.ShapeNames, ", ")+" (diurnal: a day with bursts; step: load steps; ramp: up and down; bursty: many sharp bursts)")
	fl.Uint64Var(&seed, "seed", 1, "seed of the default trace and of arrivals")
	fl.BoolVar(&asJSON, "json", false, "print one JSON object keyed by policy name")
	fl.BoolVar(&measure, "measure-cost", false, "measure the per-iteration cost on this machine's engine (one thread) instead of taking the profile's")
	fl.StringVar(&modelDir, "model", "", "model whose step cost --measure-cost measures (default: the shipped ouro-tiny-arith)")
	fl.StringVar(&plotFile, "plot", "", "write an SVG of the joint policy's τ, replicas and latency over the trace")
	return cmd
}
