package sim

import (
	"math"
	"strings"
	"testing"
)

// TestProfile: the committed profile loads, depth grows with τ from 1 to at most R, full depth
// agrees with itself, and agreement at a lower τ is never better than at the ceiling of 1.
func TestProfile(t *testing.T) {
	p := DefaultProfile()
	if p.Model != "ouro-tiny-arith" || p.MaxSteps != 4 || len(p.Cum) < 1000 {
		t.Fatalf("profile %s: %d steps, %d tokens", p.Model, p.MaxSteps, len(p.Cum))
	}
	prev := 0.0
	for k := 1; k <= 100; k++ {
		d := p.MeanDepth(float64(k) / 100)
		if d < prev-1e-12 || d < 1 || d > 4 {
			t.Fatalf("MeanDepth(%v) = %v after %v", float64(k)/100, d, prev)
		}
		prev = d
	}
	if a := p.Agreement(1); a != 1 {
		t.Errorf("Agreement(1) = %v, want 1", a)
	}
	if d := p.MeanDepth(1); d != 4 {
		t.Errorf("MeanDepth(1) = %v, want 4", d)
	}
	if !(p.StepTime(8) > p.StepTime(1)) || math.IsNaN(p.StepTime(1)) {
		t.Errorf("step cost %v at 1 row, %v at 8", p.StepTime(1), p.StepTime(8))
	}
}

func TestLoadProfileRefuses(t *testing.T) {
	for _, c := range []struct{ name, in, msg string }{
		{"not json", "{", "decoding depth profile"},
		{"no tokens", `{"maxSteps":4,"stepBaseSeconds":1e-4,"stepPerRowSeconds":1e-4}`, "0 tokens"},
		{"short token", `{"maxSteps":4,"stepBaseSeconds":1e-4,"stepPerRowSeconds":1e-4,"cum":[[1,2]],"agree":[3]}`, "token 0 has 2 steps"},
		{"no cost", `{"maxSteps":4,"cum":[[1,2,3,1000]],"agree":[3]}`, "step cost"},
	} {
		if _, err := LoadProfile([]byte(c.in)); err == nil || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: LoadProfile = %v, want an error saying %q", c.name, err, c.msg)
		}
	}
}
