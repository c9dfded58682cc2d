package bench

import (
	"path/filepath"
	"testing"

	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// TestStepCost: the fitted iteration cost is positive in both terms on a real engine.
func TestStepCost(t *testing.T) {
	m, err := model.Load(filepath.Join(testdata, "models", "ouro-tiny-random"))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	base, perRow, err := StepCost(t.Context(), m, func() engine.Backend { return cpu.New(1) })
	if err != nil {
		t.Fatal(err)
	}
	if !(base > 0 && perRow > 0 && base < 1 && perRow < 1) {
		t.Errorf("step cost %v s + %v s per row, want both in (0, 1)", base, perRow)
	}
}
