package engine

import (
	"fmt"
	"sync"

	"github.com/loopserve/loopserve/runtime/model"
)

// recorder is a test backend for scheduling tests: it records every call and computes fake
// numbers — a row's "state" is a hash of its token, position and step, its gate logit and
// argmax are functions of that hash — so exits vary and every row's results depend on its own
// inputs only. It keeps no keys or values, only block counts. (The real backends, which import
// this package, cannot serve its in-package tests.)
type recorder struct {
	mu     sync.Mutex
	R, V   int
	steps  [][]Row // every Step's rows, in call order
	grows  []int   // blocks of every GrowKV call
	copies int
	live   int // caches alive
	fail   func(rows []Row) error
}

func newRecorder(m *model.Model) *recorder {
	return &recorder{R: m.Config.TotalUTSteps, V: m.Config.VocabSize}
}

func (r *recorder) Load(m *model.Model, o LoadOptions) (Executor, error) { return r, nil }
func (r *recorder) NewStream() (Stream, error)                           { return &recStream{r: r, caches: map[KV]int{}}, nil }
func (r *recorder) KVBlock() int                                         { return 16 }
func (r *recorder) KVBlockBytes(slots int) int64                         { return int64(slots) * 1000 }
func (r *recorder) Close() error                                         { return nil }

// stepRows returns a copy of the rows of every Step so far.
func (r *recorder) stepRows() [][]Row {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([][]Row(nil), r.steps...)
}

type recStream struct {
	r      *recorder
	caches map[KV]int // blocks
	next   KV
	states map[int]uint64
}

func (s *recStream) NewKV(slots int) (KV, error) {
	s.next++
	s.caches[s.next] = 0
	s.r.mu.Lock()
	s.r.live++
	s.r.mu.Unlock()
	return s.next, nil
}

func (s *recStream) GrowKV(kv KV, blocks int) error {
	if _, ok := s.caches[kv]; !ok {
		return fmt.Errorf("grow of dead cache %d", kv)
	}
	s.caches[kv] += blocks
	s.r.mu.Lock()
	s.r.grows = append(s.r.grows, blocks)
	s.r.mu.Unlock()
	return nil
}

func (s *recStream) FreeKV(kv KV) {
	if _, ok := s.caches[kv]; !ok {
		panic(fmt.Sprintf("free of dead cache %d", kv))
	}
	delete(s.caches, kv)
	s.r.mu.Lock()
	s.r.live--
	s.r.mu.Unlock()
}

func (s *recStream) CopyKV(c []KVCopy) {
	for _, cp := range c {
		for _, kv := range []KV{cp.Src, cp.Dst} {
			if _, ok := s.caches[kv]; !ok {
				panic(fmt.Sprintf("copy with dead cache %d", kv))
			}
		}
	}
	s.r.mu.Lock()
	s.r.copies += len(c)
	s.r.mu.Unlock()
}

func (s *recStream) State(i int, dst []float32) { clear(dst) }
func (s *recStream) Close() error               { return nil }

func mix(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	return x
}

func (s *recStream) Step(b *Batch) error {
	rows := append([]Row(nil), b.Rows...)
	s.r.mu.Lock()
	s.r.steps = append(s.r.steps, rows)
	fail := s.r.fail
	s.r.mu.Unlock()
	if fail != nil {
		if err := fail(rows); err != nil {
			return err
		}
	}
	if s.states == nil {
		s.states = map[int]uint64{}
	}
	for i, row := range b.Rows {
		if blocks, ok := s.caches[row.KV]; !ok || row.Pos >= 16*blocks {
			return fmt.Errorf("row %d writes position %d of cache %d with %d blocks", i, row.Pos, row.KV, blocks)
		}
		if row.Step == 0 {
			s.states[row.State] = uint64(row.Token)
		}
		h := mix(s.states[row.State]*31 + uint64(row.Pos)*7 + uint64(row.Step) + 1)
		s.states[row.State] = h
		gate := float32(int64(h%2000)-1000) / 250
		out := RowOut{Gate: gate, Exit: row.Exit.Advance(row.ExitIn, row.Step, s.r.R, gate)}
		if row.Head.Every || (row.Head.AtExit && row.ExitIn.Chosen < 0 && out.Exit.Chosen == row.Step) {
			out.Ran, out.Argmax = true, int(h%uint64(s.r.V))
			out.Logprob = -1
			if row.Head.Logits {
				out.Logits = make([]float32, s.r.V)
				out.Logits[out.Argmax] = 5
			}
		}
		b.Out[i] = out
	}
	return nil
}
