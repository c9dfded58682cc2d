package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBenchTunerRefusesBadTrace: a malformed trace file is refused with its line and cause,
// before any simulation runs.
func TestBenchTunerRefusesBadTrace(t *testing.T) {
	for _, c := range []struct{ name, body, msg string }{
		{"decreasing", "t_seconds,requests_per_second\n0,10\n60,20\n30,5\n", "line 4: time 30 does not increase"},
		{"negative", "0,-3\n", "rate -3 outside"},
		{"empty", "", "no rows"},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "trace.csv")
			if err := os.WriteFile(path, []byte(c.body), 0o644); err != nil {
				t.Fatal(err)
			}
			cmd := newBenchCmd()
			var out bytes.Buffer
			cmd.SetOut(&out)
			cmd.SetErr(&out)
			cmd.SetArgs([]string{"tuner", "--trace", path})
			err := cmd.Execute()
			if err == nil || !strings.Contains(err.Error(), c.msg) || !strings.Contains(err.Error(), path) {
				t.Errorf("bench tuner --trace = %v, want an error naming %s and saying %q", err, path, c.msg)
			}
		})
	}
}

// TestBenchTunerRefusesBadShape: an unknown --shape is refused with the shapes there are.
func TestBenchTunerRefusesBadShape(t *testing.T) {
	cmd := newBenchCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"tuner", "--shape", "weekly"})
	err := cmd.Execute()
	if err == nil || !strings.Contains(err.Error(), `"weekly"`) || !strings.Contains(err.Error(), "diurnal, step, ramp, bursty") {
		t.Errorf("bench tuner --shape weekly = %v, want an error naming the shapes", err)
	}
}
