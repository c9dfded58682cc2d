package loadtest

import (
	"context"
	"testing"
	"time"
)

func TestQuantile(t *testing.T) {
	d := []time.Duration{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	for _, tc := range []struct {
		q    float64
		want time.Duration
	}{{0, 1}, {0.5, 5}, {0.95, 10}, {1, 10}} {
		if got := Quantile(d, tc.q); got != tc.want {
			t.Errorf("Quantile(%v) = %v, want %v", tc.q, got, tc.want)
		}
	}
	if got := Quantile(nil, 0.5); got != 0 {
		t.Errorf("Quantile(nil) = %v", got)
	}
}

func TestArithPromptShape(t *testing.T) {
	seen := map[string]bool{}
	for i := range 50 {
		p := ArithPrompt(i)
		seen[p] = true
		if len(p) < 12 || p[len(p)-1] != '=' {
			t.Errorf("ArithPrompt(%d) = %q", i, p)
		}
	}
	if len(seen) < 40 {
		t.Errorf("only %d distinct prompts of 50", len(seen))
	}
}

func TestRunRejectsUnboundedOptions(t *testing.T) {
	if _, err := Run(context.Background(), Options{URL: "http://x", Model: "m", Clients: 1}); err == nil {
		t.Error("Run without Requests or Duration succeeded")
	}
}
