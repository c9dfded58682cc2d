package gatepolicy

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestSpecRefuses: a spec the Tuner cannot honour is refused with ErrInvalidSpec saying why.
func TestSpecRefuses(t *testing.T) {
	for _, c := range []struct {
		name string
		edit func(*Spec)
		msg  string
	}{
		{"ceiling above 1", func(s *Spec) { s.Ceiling = 1.5 }, "exitThreshold 1.5 outside"},
		{"floor above ceiling", func(s *Spec) { s.Floor = 0.95 }, "minExitThreshold 0.95 outside"},
		{"no steps", func(s *Spec) { s.MaxSteps = 0 }, "maxSteps 0 outside"},
		{"replicas inverted", func(s *Spec) { s.MinReplicas, s.MaxReplicas = 5, 2 }, "replicas [5, 2]"},
		{"negative scale-down delay", func(s *Spec) { s.ScaleDownDelay = -time.Second }, "negative duration"},
		{"negative scale-up delay", func(s *Spec) { s.ScaleUpDelay = -time.Second }, "negative duration"},
		{"unknown default tier", func(s *Spec) { s.Tiers, s.DefaultTier = []Tier{{Name: "standard"}}, "gold" }, `default tier "gold"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			sp := baseSpec()
			c.edit(&sp)
			_, err := NewTuner(sp)
			if !errors.Is(err, ErrInvalidSpec) || !strings.Contains(err.Error(), c.msg) {
				t.Errorf("NewTuner = %v, want ErrInvalidSpec saying %q", err, c.msg)
			}
		})
	}
	if _, err := NewTuner(baseSpec()); err != nil {
		t.Errorf("the base spec is refused: %v", err)
	}
}
