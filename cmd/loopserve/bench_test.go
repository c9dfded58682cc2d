package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestBenchRuntimeJSON(t *testing.T) {
	cmd := newBenchCmd()
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs([]string{"runtime", "--model", "../../../shared/models/ouro-tiny-random", "--json", "--peer=false",
		"--prefill", "8", "--prompt", "4", "--tokens", "6", "--batch", "2", "--bandwidth-mib", "64", "--bandwidth-passes", "1"})
	if err := cmd.Execute(); err != nil {
		t.Fatal(err)
	}
	var rep map[string]any
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("output %q is not one JSON object: %v", out.String(), err)
	}
	for _, k := range []string{"decode_tok_s_b1", "decode_tok_s_b8", "prefill_tok_s", "bandwidth_gb_s", "bandwidth_fraction_b1"} {
		if v, ok := rep[k].(float64); !ok || v <= 0 {
			t.Errorf("%s = %v, want a positive number", k, rep[k])
		}
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
