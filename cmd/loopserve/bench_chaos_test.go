package main

import (
	"bytes"
	"strings"
	"testing"
)

// TestBenchChaosRegistered: `bench chaos` is a bench subcommand, bounded by --duration, and its
// help names the counts it prints.
func TestBenchChaosRegistered(t *testing.T) {
	cmd, _, err := newBenchCmd().Find([]string{"chaos"})
	if err != nil || cmd.Name() != "chaos" {
		t.Fatalf("bench chaos: %v %v", cmd, err)
	}
	if d := cmd.Flags().Lookup("duration"); d == nil || d.DefValue != "2m0s" {
		t.Errorf("--duration = %+v, want a 2m default", d)
	}
	var out bytes.Buffer
	cmd.SetOut(&out)
	if err := cmd.Help(); err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"accepted", "completed", "failed cleanly", "lost", "duplicated", "--scripted", "--seed"} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("help lacks %q", w)
		}
	}
}
