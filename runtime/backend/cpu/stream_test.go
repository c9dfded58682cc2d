package cpu_test

import (
	"fmt"
	"math"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/backend/ref"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

func tinyModel(t testing.TB, name string) *model.Model {
	t.Helper()
	m, err := model.Load(filepath.Join("../../../testdata/models", name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// script drives a stream through a fixed history: a KVFull cache prefilled over every step,
// a KVLast one beside it, a fill of skipped slots, then decode rows at mixed steps. Each call
// of step returns the outputs (copied) and the states of its rows.
type script struct {
	t      testing.TB
	st     engine.Stream
	R, H   int
	full   engine.KV
	last   engine.KV
	states map[int]bool
}

type stepOut struct {
	rows   []engine.Row
	outs   []engine.RowOut
	logits [][]float32
	states [][]float32
}

func newScript(t testing.TB, be engine.Backend, m *model.Model, kvBF16 bool) *script {
	t.Helper()
	ex, err := be.Load(m, engine.LoadOptions{KVBF16: kvBF16})
	if err != nil {
		t.Fatal(err)
	}
	st, err := ex.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	s := &script{t: t, st: st, R: m.Config.TotalUTSteps, H: m.Config.HiddenSize, states: map[int]bool{}}
	if s.full, err = st.NewKV(s.R); err != nil {
		t.Fatal(err)
	}
	if s.last, err = st.NewKV(1); err != nil {
		t.Fatal(err)
	}
	for _, kv := range []engine.KV{s.full, s.last} {
		if err := st.GrowKV(kv, 3); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func (s *script) step(rows []engine.Row) stepOut {
	s.t.Helper()
	b := engine.Batch{Rows: rows, Out: make([]engine.RowOut, len(rows))}
	if err := s.st.Step(&b); err != nil {
		s.t.Fatal(err)
	}
	o := stepOut{rows: rows, outs: b.Out}
	for i, r := range rows {
		o.logits = append(o.logits, append([]float32(nil), b.Out[i].Logits...))
		b.Out[i].Logits = nil
		o.outs[i].Top = append([]engine.Logprob(nil), b.Out[i].Top...)
		st := make([]float32, s.H)
		s.st.State(r.State, st)
		o.states = append(o.states, st)
	}
	return o
}

// history runs the script's fixed steps and returns every step's outputs. With split, the
// decode rows of one loop step run one Step each, and their outputs are joined.
func (s *script) history(vocab int, split ...bool) []stepOut {
	var outs []stepOut
	rule := engine.ExitRule{Tau: 0.6, MaxDepth: s.R}
	head := engine.Head{AtExit: true, Logits: true, Logprobs: true, Top: 3}
	exits := map[int]engine.ExitState{}
	prefill := func(kv engine.KV, n, state0, t int, last bool) []engine.Row {
		var rows []engine.Row
		for p := 0; p < n; p++ {
			slot := t
			if last {
				slot = 0
			}
			st := state0 + p
			if t == 0 {
				exits[st] = engine.StartExit
			}
			rows = append(rows, engine.Row{State: st, Token: (7*p + 3*state0) % vocab, Step: t, Pos: p, KV: kv, Slot: slot,
				Exit: rule, ExitIn: exits[st], Head: engine.Head{Every: p == n-1, Logits: true, Score: true, ScoreID: 5}})
		}
		return rows
	}
	for t := 0; t < s.R; t++ {
		rows := append(prefill(s.full, 11, 0, t, false), prefill(s.last, 6, 20, t, true)...)
		o := s.step(rows)
		for i, r := range rows {
			exits[r.State] = o.outs[i].Exit
		}
		outs = append(outs, o)
	}
	// A token that exits at step 1 fills slots 2.. of the full cache from it.
	s.st.CopyKV([]engine.KVCopy{{Dst: s.full, Src: s.full, DstSlot: 2, SrcSlot: 1, DstPos: 3, SrcPos: 3, N: 2},
		{Dst: s.full, Src: s.full, DstSlot: 3, SrcSlot: 1, DstPos: 3, SrcPos: 3, N: 2}})
	// Decode rows of both caches at different steps, in one batch.
	dec := map[int]engine.ExitState{40: engine.StartExit, 41: engine.StartExit}
	for t := 0; t < s.R; t++ {
		rows := []engine.Row{
			{State: 40, Token: 9, Step: t, Pos: 11, KV: s.full, Slot: t, Exit: rule, ExitIn: dec[40], Head: head},
		}
		if t < 2 {
			rows = append(rows, engine.Row{State: 41, Token: 17, Step: t, Pos: 6, KV: s.last, Slot: 0, Exit: engine.ExitRule{MaxDepth: 2, Forced: true},
				ExitIn: dec[41], Head: head})
		}
		var o stepOut
		if len(split) > 0 && split[0] {
			for _, r := range rows {
				one := s.step([]engine.Row{r})
				o.rows, o.outs = append(o.rows, one.rows...), append(o.outs, one.outs...)
				o.logits, o.states = append(o.logits, one.logits...), append(o.states, one.states...)
			}
		} else {
			o = s.step(rows)
		}
		for i, r := range rows {
			dec[r.State] = o.outs[i].Exit
		}
		outs = append(outs, o)
	}
	return outs
}

func relClose(a, b []float32, tol float64) (float64, bool) {
	var scale, worst float64
	for _, v := range b {
		scale = math.Max(scale, math.Abs(float64(v)))
	}
	for i := range a {
		worst = math.Max(worst, math.Abs(float64(a[i])-float64(b[i])))
	}
	return worst / math.Max(scale, 1), worst <= tol*math.Max(scale, 1) && len(a) == len(b)
}

// TestStreamMatchesReference runs the same history of loop steps (prefill of two caches under
// both policies, slot fills, decode rows at mixed steps) on the CPU stream and on the reference
// stream: states, gates, exits and logits agree, for every tiny model, float32 and bfloat16
// keys and values.
func TestStreamMatchesReference(t *testing.T) {
	for _, name := range []string{"ouro-tiny-random", "ouro-tiny-arith"} {
		m := tinyModel(t, name)
		for _, half := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/bf16kv=%v", name, half), func(t *testing.T) {
				got := newScript(t, cpu.New(2), m, half).history(m.Config.VocabSize)
				want := newScript(t, ref.Backend{}, m, half).history(m.Config.VocabSize)
				for k := range want {
					for i := range want[k].rows {
						g, w := got[k], want[k]
						tol := 2e-4
						if half {
							tol = 2e-3 // keys near a bfloat16 rounding boundary may round apart
						}
						if d, ok := relClose(g.states[i], w.states[i], tol); !ok {
							t.Errorf("step %d row %d: state differs by %.3g (relative)", k, i, d)
						}
						if d := math.Abs(float64(g.outs[i].Gate - w.outs[i].Gate)); d > 1e-4 {
							t.Errorf("step %d row %d: gate %g, reference %g", k, i, g.outs[i].Gate, w.outs[i].Gate)
						}
						if g.outs[i].Exit.Chosen != w.outs[i].Exit.Chosen || g.outs[i].Ran != w.outs[i].Ran {
							t.Errorf("step %d row %d: exit %+v ran %v, reference %+v ran %v", k, i, g.outs[i].Exit, g.outs[i].Ran, w.outs[i].Exit, w.outs[i].Ran)
						}
						if d, ok := relClose(g.logits[i], w.logits[i], tol); !ok {
							t.Errorf("step %d row %d: logits differ by %.3g (relative)", k, i, d)
						}
						if g.outs[i].Ran && (g.outs[i].Argmax != w.outs[i].Argmax || math.Abs(float64(g.outs[i].Score-w.outs[i].Score)) > 1e-3) {
							t.Errorf("step %d row %d: argmax %d score %g, reference %d %g", k, i, g.outs[i].Argmax, g.outs[i].Score, w.outs[i].Argmax, w.outs[i].Score)
						}
					}
				}
			})
		}
	}
}

// TestStreamWithoutAVX512 runs the reference comparison with the AVX-512 kernels off: the
// AVX2 (or portable) path of CPUs without AVX-512.
func TestStreamWithoutAVX512(t *testing.T) {
	defer cpu.WithoutAVX512()()
	m := tinyModel(t, "ouro-tiny-arith")
	got := newScript(t, cpu.New(2), m, false).history(m.Config.VocabSize)
	want := newScript(t, ref.Backend{}, m, false).history(m.Config.VocabSize)
	for k := range want {
		for i := range want[k].rows {
			if d, ok := relClose(got[k].states[i], want[k].states[i], 2e-4); !ok {
				t.Errorf("step %d row %d: state differs by %.3g (relative)", k, i, d)
			}
			if d, ok := relClose(got[k].logits[i], want[k].logits[i], 2e-4); !ok {
				t.Errorf("step %d row %d: logits differ by %.3g (relative)", k, i, d)
			}
		}
	}
}

// TestStreamInvariance: a stream's results are bit for bit the same whatever the number of
// threads (which splits the heads, columns and vocabulary differently), and a row's results do
// not depend on the other rows of its step: under both numerics.
func TestStreamInvariance(t *testing.T) {
	m := tinyModel(t, "ouro-tiny-arith")
	V := m.Config.VocabSize
	numerics := []cpu.Numerics{cpu.Exact}
	if be, err := cpu.NewWith(cpu.Options{Numerics: cpu.BF16}); err == nil {
		_ = be.Close()
		numerics = append(numerics, cpu.BF16)
	} else {
		t.Logf("bf16 numerics not tested: %v", err)
	}
	for _, num := range numerics {
		backend := func(threads int) engine.Backend {
			be, err := cpu.NewWith(cpu.Options{Threads: threads, Numerics: num})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { be.Close() })
			return be
		}
		want := newScript(t, backend(1), m, false).history(V)
		for _, threads := range []int{2, 3} {
			got := newScript(t, backend(threads), m, false).history(V)
			if diff := cmp.Diff(got, want, cmp.AllowUnexported(stepOut{})); diff != "" {
				t.Errorf("%v, %d threads (-got +1 thread):\n%s", num, threads, diff)
			}
		}
		// The decode rows one Step each, instead of batched together.
		alone := newScript(t, backend(2), m, false).history(V, true)
		if diff := cmp.Diff(alone, want, cmp.AllowUnexported(stepOut{})); diff != "" {
			t.Errorf("%v: rows stepped alone differ from rows batched (-alone +batched):\n%s", num, diff)
		}
	}
}

// TestStreamsShareBackend: streams of one Backend stepping at the same time (one holds the
// workers' spinning lanes, the others hand their phases through the channel) each get the
// results of a stream stepping alone.
func TestStreamsShareBackend(t *testing.T) {
	m := tinyModel(t, "ouro-tiny-arith")
	V := m.Config.VocabSize
	want := newScript(t, cpu.New(1), m, false).history(V)
	be := cpu.New(3)
	t.Cleanup(func() { be.Close() })
	for i := range 4 {
		t.Run(fmt.Sprint("stream", i), func(t *testing.T) {
			t.Parallel()
			for range 3 {
				got := newScript(t, be, m, false).history(V)
				if diff := cmp.Diff(got, want, cmp.AllowUnexported(stepOut{})); diff != "" {
					t.Fatalf("(-shared +alone):\n%s", diff)
				}
			}
		})
	}
}

// TestStepAllocatesNothing: once buffers have grown, a loop step allocates nothing.
func TestStepAllocatesNothing(t *testing.T) {
	m := tinyModel(t, "ouro-tiny-random")
	s := newScript(t, cpu.New(2), m, false)
	rows := []engine.Row{
		{State: 0, Token: 1, Pos: 0, KV: s.full, Exit: engine.ExitRule{MaxDepth: 4}, ExitIn: engine.StartExit, Head: engine.Head{Every: true, Logits: true}},
		{State: 1, Token: 2, Pos: 1, KV: s.full, Exit: engine.ExitRule{MaxDepth: 4}, ExitIn: engine.StartExit},
		{State: 2, Token: 3, Pos: 0, KV: s.last, Exit: engine.ExitRule{MaxDepth: 4}, ExitIn: engine.StartExit, Head: engine.Head{AtExit: true}},
	}
	b := engine.Batch{Rows: rows, Out: make([]engine.RowOut, len(rows))}
	if err := s.st.Step(&b); err != nil {
		t.Fatal(err)
	}
	if a := testing.AllocsPerRun(10, func() { _ = s.st.Step(&b) }); a != 0 {
		t.Errorf("step allocates %g times", a)
	}
}

// TestStepRefusesBadRows: rows naming tokens, steps or positions out of range are refused with
// an error, and nothing is computed.
func TestStepRefusesBadRows(t *testing.T) {
	m := tinyModel(t, "ouro-tiny-random")
	s := newScript(t, cpu.New(2), m, false)
	ok := engine.Row{Token: 1, KV: s.full, Exit: engine.ExitRule{MaxDepth: 4}, ExitIn: engine.StartExit}
	for _, bad := range []func(r *engine.Row){
		func(r *engine.Row) { r.Token = m.Config.VocabSize },
		func(r *engine.Row) { r.Token = -1 },
		func(r *engine.Row) { r.Step = 4 },
		func(r *engine.Row) { r.Pos = 48 },
		func(r *engine.Row) { r.Head = engine.Head{AtExit: true, Score: true, ScoreID: -3} },
	} {
		r := ok
		bad(&r)
		b := engine.Batch{Rows: []engine.Row{ok, r}, Out: make([]engine.RowOut, 2)}
		if err := s.st.Step(&b); err == nil {
			t.Errorf("row %+v: no error", r)
		}
	}
}
