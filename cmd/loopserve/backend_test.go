package main

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/runtime/backend/cpu"
)

func TestParseBytes(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"1024", 1024, true}, {"8GiB", 8 << 30, true}, {"512 MiB", 512 << 20, true}, {"2e9", 2e9, true},
		{"1.5GB", 1.5e9, true}, {"3KiB", 3 << 10, true}, {"", 0, false}, {"-1GiB", 0, false}, {"lots", 0, false}, {"9e30", 0, false},
	} {
		got, err := parseBytes(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseBytes(%q) = %d, %v; want %d, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

// TestServeEngineFlags: the engine flags reach the engine options, and bad ones are refused
// with a message naming the flag.
func TestServeEngineFlags(t *testing.T) {
	parse := func(args ...string) (*serveEngineFlags, error) {
		var f serveEngineFlags
		cmd := &cobra.Command{Use: "x", RunE: func(*cobra.Command, []string) error { return nil }}
		f.register(cmd, 0)
		cmd.SetArgs(args)
		return &f, cmd.Execute()
	}
	f, err := parse("--max-batched-tokens", "96", "--kv-memory", "2GiB", "--threads", "1", "--numerics", "exact")
	if err != nil {
		t.Fatal(err)
	}
	opts, err := f.options()
	if err != nil {
		t.Fatal(err)
	}
	if opts.MaxBatchedTokens != 96 || opts.MaxKVBytes != 2<<30 {
		t.Errorf("options %+v: want 96 batched tokens and a 2 GiB KV budget", opts)
	}
	if be, ok := opts.Backend.(*cpu.Backend); !ok || be.Numerics() != cpu.Exact {
		t.Errorf("backend %T, want the exact CPU backend", opts.Backend)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--backend", "tpu"}, "--backend"},
		{[]string{"--numerics", "fp8"}, "--numerics"},
		{[]string{"--kv-memory", "lots"}, "--kv-memory"},
		{[]string{"--kv-memory", "0"}, "--kv-memory"},
		{[]string{"--max-batched-tokens", "-1"}, "--max-batched-tokens"},
		{[]string{"--threads", "-2"}, "--threads"},
	} {
		f, err := parse(tc.args...)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.options(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want one mentioning %q", tc.args, err, tc.want)
		}
	}
}
