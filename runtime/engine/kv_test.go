package engine

import (
	"context"
	"testing"

	"github.com/loopserve/loopserve/runtime/model"
)

// naive is a minimal Backend for in-package tests (the real ones live in backend/cpu, which
// imports this package).
type naive struct{}

func (naive) MatMul(out, x []float32, n int, w *model.Matrix) {
	for r := 0; r < w.Rows; r++ {
		for i := 0; i < n; i++ {
			var s float32
			for j := 0; j < w.Cols; j++ {
				if w.BF16 != nil {
					s += model.BF16ToF32(w.BF16[r*w.Cols+j]) * x[i*w.Cols+j]
				} else {
					s += w.F32[r*w.Cols+j] * x[i*w.Cols+j]
				}
			}
			out[i*w.Rows+r] = s
		}
	}
}

func (naive) RMSNorm(out, x []float32, n int, weight []float32, eps float32) {
	d := len(weight)
	for i := 0; i < n; i++ {
		var ss float32
		for _, v := range x[i*d : (i+1)*d] {
			ss += v * v
		}
		inv := 1 / float32(sqrt(float64(ss/float32(d)+eps)))
		for j := 0; j < d; j++ {
			out[i*d+j] = weight[j] * x[i*d+j] * inv
		}
	}
}

func (naive) RoPE([]float32, int, int, int, []int, []float32) {}

func (naive) SiLUMul(gate, up []float32) {
	for i := range gate {
		gate[i] *= sigmoid(gate[i]) * up[i]
	}
}

func (naive) Attention(jobs []AttnJob, heads, kvHeads, headDim int, scale float32) {
	for _, j := range jobs {
		clear(j.Out)
		for h := 0; h < heads; h++ {
			// Attend to the newest position only: enough to move data through the cache.
			off := (h / (heads / kvHeads)) * headDim
			copy(j.Out[h*headDim:(h+1)*headDim], j.V[(j.N-1)*kvHeads*headDim+off:][:headDim])
		}
	}
}

func sqrt(x float64) float64 {
	z := x
	for i := 0; i < 40; i++ {
		z = (z + x/z) / 2
	}
	return z
}

// TestKVMemoryRatio: after the same generation, the KVFull cache holds R× the bytes of KVLast.
func TestKVMemoryRatio(t *testing.T) {
	m, err := model.Load("../../testdata/models/ouro-tiny-random")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	R := m.Config.TotalUTSteps
	used, alloc := map[KVPolicy]int64{}, map[KVPolicy]int64{}
	for _, p := range []KVPolicy{KVFull, KVLast} {
		e, err := New(m, Options{Backend: naive{}, Mode: Fast, KVPolicy: p, Threshold: 0.5})
		if err != nil {
			t.Fatal(err)
		}
		s := e.newSequence(context.Background(), Request{Prompt: []int{1, 2, 3, 4, 5}, MaxTokens: 20, IgnoreEOS: true})
		b := newBatcher(e)
		// Stop one token short: a finished sequence has released its cache.
		for s.generated < 19 {
			b.iterate([]*sequence{s})
		}
		if s.done {
			t.Fatalf("%v: done after %d tokens", p, s.generated)
		}
		if got := e.kvBudget.used.Load(); got != s.kv.bytes() {
			t.Errorf("%v: budget counts %d bytes, cache holds %d", p, got, s.kv.bytes())
		}
		used[p] = s.kv.usedBytes(len(s.tokens) - 1)
		defer func() {
			for !s.done {
				b.iterate([]*sequence{s})
			}
			if !s.done || e.kvBudget.used.Load() != 0 {
				t.Errorf("%v: done %v, %d bytes still counted after the last token", p, s.done, e.kvBudget.used.Load())
			}
		}()
		for i := range s.kv.k {
			alloc[p] += int64(4 * (len(s.kv.k[i]) + len(s.kv.v[i])))
		}
		if s.kv.bytes() < used[p] {
			t.Fatalf("%v: %d bytes allocated for %d used", p, s.kv.bytes(), used[p])
		}
	}
	if alloc[KVFull] != int64(R)*alloc[KVLast] || alloc[KVLast] == 0 {
		t.Errorf("KV allocations full %d, last %d: want ratio %d:1", alloc[KVFull], alloc[KVLast], R)
	}
	if used[KVFull] != int64(R)*used[KVLast] || used[KVLast] == 0 {
		t.Errorf("KV bytes full %d, last %d: want ratio %d:1", used[KVFull], used[KVLast], R)
	}
	t.Logf("KV bytes after 18 decode steps: full %d, last %d", used[KVFull], used[KVLast])
}

// TestStepAllocatesNothing: once buffers have grown, a loop step over a batch allocates nothing.
func TestStepAllocatesNothing(t *testing.T) {
	m, err := model.Load("../../testdata/models/ouro-tiny-random")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	r := newRunner(m, naive{})
	kv := newKVCache(KVFull, m.Config.TotalUTSteps, m.Config.NumHiddenLayers, m.Config.KVDim(), false)
	kv.reserve(8)
	rows := []fwdRow{{kv, 0, 0}, {kv, 1, 0}, {kv, 2, 0}}
	h := make([]float32, 3*m.Config.HiddenSize)
	r.step(rows, h)
	if a := testing.AllocsPerRun(10, func() { r.step(rows, h) }); a != 0 {
		t.Errorf("step allocates %g times", a)
	}
}
