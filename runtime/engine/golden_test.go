package engine_test

import (
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

const testdata = "../../testdata"

var goldenModels = []string{"ouro-tiny-random", "ouro-tiny-arith"}

type goldenRun struct {
	IDs    []int `json:"ids"`
	Depths []int `json:"depths"`
}

type goldenJSON struct {
	Prompts []struct {
		Text     string               `json:"text"`
		Generate map[string]goldenRun `json:"generate"`
	} `json:"prompts"`
}

type golden struct {
	json    goldenJSON
	tensors map[string]model.Tensor
}

func loadModel(t testing.TB, name string) *model.Model {
	t.Helper()
	m, err := model.Load(filepath.Join(testdata, "models", name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func loadGolden(t testing.TB, name string) (*model.Model, golden) {
	t.Helper()
	m := loadModel(t, name)
	var g golden
	b, err := os.ReadFile(filepath.Join(testdata, "golden", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &g.json); err != nil {
		t.Fatal(err)
	}
	ts, _, err := model.ReadSafetensors(filepath.Join(testdata, "golden", name+".safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	g.tensors = map[string]model.Tensor{}
	for _, x := range ts {
		g.tensors[x.Name] = x
	}
	return m, g
}

func (g golden) ids(t testing.TB, k int) []int {
	t.Helper()
	v, err := g.tensors["p"+strconv.Itoa(k)+".input_ids"].Int64()
	if err != nil {
		t.Fatal(err)
	}
	out := make([]int, len(v))
	for i, x := range v {
		out[i] = int(x)
	}
	return out
}

func (g golden) f32(t testing.TB, k int, what string) []float32 {
	t.Helper()
	v, err := g.tensors["p"+strconv.Itoa(k)+"."+what].Float32()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func maxAbsDiff(t testing.TB, got, want []float32) float64 {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("length %d, want %d", len(got), len(want))
	}
	var m float64
	for i := range got {
		m = math.Max(m, math.Abs(float64(got[i])-float64(want[i])))
	}
	return m
}

func TestForwardMatchesGolden(t *testing.T) {
	backends := []struct {
		name string
		be   engine.Backend
	}{{"cpu", cpu.New(0)}, {"reference", cpu.Reference{}}}
	for _, name := range goldenModels {
		m, g := loadGolden(t, name)
		for k := range g.json.Prompts {
			for _, b := range backends {
				if b.name == "reference" && (k > 0 || name != "ouro-tiny-random") {
					continue // the oracle is slow; one prompt shows it agrees
				}
				tr, err := engine.Forward(context.Background(), m, b.be, g.ids(t, k))
				if err != nil {
					t.Fatal(err)
				}
				for _, c := range []struct {
					what string
					got  []float32
					tol  float64
				}{
					{"step_logits", tr.StepLogits, 1e-3},
					{"gate_logits", tr.GateLogits, 1e-4},
					{"exit_pdf", tr.ExitPDF, 1e-4},
					{"final_hidden", tr.Hidden, 1e-3},
				} {
					d := maxAbsDiff(t, c.got, g.f32(t, k, c.what))
					if d > c.tol {
						t.Errorf("%s p%d %s: %s differs by %g (tolerance %g)", name, k, b.name, c.what, d, c.tol)
					}
					t.Logf("%s p%d %s: %s max abs diff %.3g", name, k, b.name, c.what, d)
				}
			}
		}
	}
}

func cpuBackend() engine.Backend { return cpu.New(0) }
