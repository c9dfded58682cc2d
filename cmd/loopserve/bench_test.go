package main

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"
)

func TestBenchRuntimeJSON(t *testing.T) {
	cmd := newBenchCmd()
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs([]string{"runtime", "--model", "../../testdata/models/ouro-tiny-random", "--json", "--peer=false",
		"--prefill", "8", "--prompt", "4", "--tokens", "48", "--batch", "2", "--bandwidth-mib", "64", "--bandwidth-passes", "1"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	var rep map[string]any
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("output %q is not one JSON object: %v", out.String(), err)
	}
	for _, k := range []string{"decode_tok_s_b1", "decode_tok_s_b8", "prefill_tok_s", "bandwidth_gb_s", "bandwidth_fraction_b1", "bandwidth_fraction_b1_paired"} {
		if v, ok := rep[k].(float64); !ok || v <= 0 {
			t.Errorf("%s = %v, want a positive number", k, rep[k])
		}
	}
	// One round of 48 tokens: 47 paired after the first.
	if rep["bandwidth_fraction_b1_paired_tokens"] != 47.0 {
		t.Errorf("bandwidth_fraction_b1_paired_tokens = %v, want 47", rep["bandwidth_fraction_b1_paired_tokens"])
	}
	for _, k := range []string{"peer_decode_tok_s_b1", "peer_prefill_tok_s"} {
		if v, ok := rep[k]; !ok || v != nil {
			t.Errorf("%s = %v, want null without --peer", k, v)
		}
	}
	if rep["loop_steps_per_token"] != 4.0 || rep["prefill_tokens"] != 8.0 || rep["batch"] != 2.0 {
		t.Errorf("loop_steps_per_token %v, prefill_tokens %v, batch %v; want 4, 8, 2", rep["loop_steps_per_token"], rep["prefill_tokens"], rep["batch"])
	}
	if errOut.Len() != 0 {
		t.Errorf("--json wrote to stderr: %q", errOut.String())
	}
}

// TestBenchRuntimePairedOff checks that --paired=false skips the paired decode.
func TestBenchRuntimePairedOff(t *testing.T) {
	cmd := newBenchCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs([]string{"runtime", "--model", "../../testdata/models/ouro-tiny-random", "--json", "--peer=false", "--paired=false",
		"--prefill", "8", "--prompt", "4", "--tokens", "12", "--batch", "2", "--bandwidth-mib", "16", "--bandwidth-passes", "1"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	var rep map[string]any
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("output %q is not one JSON object: %v", out.String(), err)
	}
	if rep["bandwidth_fraction_b1_paired_tokens"] != 0.0 || rep["bandwidth_fraction_b1_paired"] != 0.0 {
		t.Errorf("paired fraction %v over %v tokens, want 0 over 0 with --paired=false", rep["bandwidth_fraction_b1_paired"], rep["bandwidth_fraction_b1_paired_tokens"])
	}
	if v, ok := rep["decode_tok_s_b1"].(float64); !ok || v <= 0 {
		t.Errorf("decode_tok_s_b1 = %v, want a positive number", rep["decode_tok_s_b1"])
	}
}

// TestBenchRuntimeBaseline runs --baseline with this binary as the baseline: the ratios to it
// are those of this binary run the same way (its own process), not of the in-process engine.
func TestBenchRuntimeBaseline(t *testing.T) {
	t.Setenv("LOOPSERVE_TEST_AS_CLI", "1") // the processes it starts are this test binary as loopserve
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := newBenchCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs([]string{"runtime", "--model", "../../testdata/models/ouro-tiny-random", "--json", "--peer=false", "--threshold", "0",
		"--prefill", "8", "--prompt", "4", "--tokens", "48", "--batch", "2", "--bandwidth-mib", "64", "--bandwidth-passes", "1",
		"--baseline", bin, "--rounds", "2"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Engines []map[string]any `json:"engines"`
		Own     []map[string]any `json:"own_process"`
		Base    map[string]any   `json:"baseline"`
	}
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("output %q is not one JSON object: %v", out.String(), err)
	}
	if len(rep.Engines) != 1 || len(rep.Own) != 1 || rep.Base == nil {
		t.Fatalf("engines %v, own_process %v, baseline %v: want one engine, one own-process run and a baseline", rep.Engines, rep.Own, rep.Base)
	}
	if got, want := rep.Own[0]["name"], "exact (own process)"; got != want {
		t.Errorf("own_process name = %v, want %q", got, want)
	}
	for _, k := range []string{"prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b8", "baseline_ratio_prefill", "baseline_ratio_decode_b1", "baseline_ratio_decode_b8"} {
		if v, ok := rep.Own[0][k].(float64); !ok || v <= 0 {
			t.Errorf("own_process %s = %v, want a positive number", k, rep.Own[0][k])
		}
		if strings.HasPrefix(k, "baseline_") && rep.Engines[0][k] != nil {
			t.Errorf("engines[0] %s = %v, want null (in-process figures are not compared with a process's)", k, rep.Engines[0][k])
		}
	}
	if v, ok := rep.Base["prefill_tok_s"].(float64); !ok || v <= 0 {
		t.Errorf("baseline prefill_tok_s = %v, want a positive number", rep.Base["prefill_tok_s"])
	}
}

// TestBenchRuntimeAdaptive checks the early-exit figures: on the trained tiny model at τ 0.5
// tokens exit before the last loop step, and the full-depth figures stay at full depth.
func TestBenchRuntimeAdaptive(t *testing.T) {
	for _, tc := range []struct {
		threshold string
		adaptive  bool
	}{
		{"0.5", true},
		{"0", false},
	} {
		t.Run(tc.threshold, func(t *testing.T) {
			cmd := newBenchCmd()
			var out bytes.Buffer
			cmd.SetOut(&out)
			cmd.SetErr(&bytes.Buffer{})
			cmd.SetArgs([]string{"runtime", "--model", "../../testdata/models/ouro-tiny-arith", "--json", "--peer=false",
				"--threshold", tc.threshold, "--prefill", "8", "--prompt", "4", "--tokens", "16", "--batch", "2",
				"--bandwidth-mib", "16", "--bandwidth-passes", "1"})
			if err := cmd.Execute(); err != nil {
				t.Fatal(err)
			}
			var rep map[string]any
			if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
				t.Fatalf("output %q is not one JSON object: %v", out.String(), err)
			}
			if rep["loop_steps_per_token"] != 4.0 {
				t.Errorf("loop_steps_per_token = %v, want 4 (the full-depth figures)", rep["loop_steps_per_token"])
			}
			keys := []string{"decode_tok_s_b1_adaptive", "decode_tok_s_b8_adaptive", "mean_depth_adaptive", "ratio_decode_b1_adaptive"}
			if !tc.adaptive {
				for _, k := range keys {
					if v, ok := rep[k]; !ok || v != nil {
						t.Errorf("%s = %v, want null at --threshold 0", k, v)
					}
				}
				return
			}
			for _, k := range keys[:2] {
				if v, ok := rep[k].(float64); !ok || v <= 0 {
					t.Errorf("%s = %v, want a positive number", k, rep[k])
				}
			}
			if d, ok := rep["mean_depth_adaptive"].(float64); !ok || d < 1 || d >= 4 {
				t.Errorf("mean_depth_adaptive = %v, want in [1, 4): tokens of the trained model exit early at τ 0.5", rep["mean_depth_adaptive"])
			}
			if v, ok := rep["ratio_decode_b1_adaptive"]; !ok || v != nil {
				t.Errorf("ratio_decode_b1_adaptive = %v, want null without --peer", v)
			}
			if rep["threshold"] != 0.5 {
				t.Errorf("threshold = %v, want 0.5", rep["threshold"])
			}
		})
	}
}

// TestPrintRuntimeReportAdaptive checks that the table keeps the early-exit figures apart
// and says they are not the peer's computation.
func TestPrintRuntimeReportAdaptive(t *testing.T) {
	f := func(v float64) *float64 { return &v }
	r := runtimeReport{Model: "m", LoopSteps: 4, Batch: 8, DecodeTokSB1: 1, DecodeTokSB8: 4, PeerDecodeTokSB1: f(0.8),
		RatioDecodeB1: f(1.25), Threshold: 0.5, DecodeTokSB1Adaptive: f(2), DecodeTokSB8Adaptive: f(8.5),
		MeanDepthAdaptive: f(2), RatioDecodeB1Adaptive: f(2.5)}
	var out bytes.Buffer
	if err := printRuntimeReport(&out, r); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{
		"adaptive depth (early exit at τ 0.5, mean depth 2.00 of 4 loop steps; a different computation from the peer's full depth",
		"decode tok/s, batch 1  2.00                0.8              2.50×",
		"decode tok/s, batch 8  8.50                -                -",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("report lacks %q:\n%s", want, got)
		}
	}
	r.DecodeTokSB1Adaptive = nil
	out.Reset()
	if err := printRuntimeReport(&out, r); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out.String(), "adaptive") {
		t.Errorf("report without adaptive figures mentions them:\n%s", out.String())
	}
}

func TestBenchRuntimeErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"runtime", "--peer=false", "--bandwidth-mib", "8", "--bandwidth-passes", "1", "--model", "/nonexistent"}, "no such file"},
		{[]string{"runtime", "--peer-script", "/nonexistent/ouro.py"}, "peer"},
		{[]string{"runtime", "--peer=false", "--bandwidth-passes", "0", "--model", "../../testdata/models/ouro-tiny-arith",
			"--prefill", "4", "--prompt", "2", "--tokens", "2", "--batch", "2"}, "passes"},
		{[]string{"runtime", "--peer=false", "--rounds", "0"}, "--rounds"},
		{[]string{"runtime", "--peer=false", "--threshold", "1.5"}, "--threshold"},
		{[]string{"runtime", "--peer=false", "--threshold", "-0.1"}, "--threshold"},
	} {
		cmd := newBenchCmd()
		cmd.SetOut(&bytes.Buffer{})
		cmd.SetErr(&bytes.Buffer{})
		cmd.SetArgs(tc.args)
		if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("bench %v: error %v, want one mentioning %q", tc.args, err, tc.want)
		}
	}
}
