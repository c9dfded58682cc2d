package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/loopserve/loopserve/runtime/model"
)

func loadTiny(t *testing.T) *model.Model {
	t.Helper()
	m, err := model.Load("../../testdata/models/ouro-tiny-random")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// running starts e.Run and stops it at cleanup.
func running(t *testing.T, e *Engine) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
}

// collect drains ch, returning the tokens and the Done event.
func collect(ch <-chan Event) (toks []Token, end Event) {
	for ev := range ch {
		if ev.Done {
			end = ev
			continue
		}
		toks = append(toks, ev.Token)
	}
	return toks, end
}

// TestMaxBatchedTokens: under either KV policy, a long prompt arriving while three requests
// decode is prefilled in chunks that fit the iteration's row budget beside them: no iteration
// passes the budget, and every iteration of the prefill still advances each decoding request.
func TestMaxBatchedTokens(t *testing.T) {
	m := loadTiny(t)
	const budget = 24
	for _, kv := range []KVPolicy{KVFull, KVLast} {
		t.Run(kv.String(), func(t *testing.T) {
			rec := newRecorder(m)
			e, err := New(m, Options{Backend: rec, Mode: Fast, KVPolicy: kv, MaxBatch: 8, MaxBatchedTokens: budget, Threshold: 0.5, MaxContext: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			running(t, e)
			ctx := context.Background()
			var got [3]atomic.Int32
			for i := range 3 {
				ch, err := e.Submit(ctx, Request{ID: fmt.Sprint(i), Prompt: []int{1, 2, 3, 4 + i}, MaxTokens: 1 << 19, IgnoreEOS: true})
				if err != nil {
					t.Fatal(err)
				}
				go func() {
					for range ch {
						got[i].Add(1)
					}
				}()
			}
			// Wait until all three decode, then note their caches.
			waitUntil(t, func() bool { return got[0].Load() > 1 && got[1].Load() > 1 && got[2].Load() > 1 })
			before := len(rec.stepRows())
			decoding := map[KV]bool{}
			for _, rows := range rec.stepRows()[before-1:] {
				for _, r := range rows {
					decoding[r.KV] = true
				}
			}
			if len(decoding) != 3 {
				t.Fatalf("%d requests decoding, want 3", len(decoding))
			}
			prompt := make([]int, 300)
			for i := range prompt {
				prompt[i] = 5 + i%50
			}
			long, err := e.Submit(ctx, Request{ID: "long", Prompt: prompt, MaxTokens: 1, IgnoreEOS: true})
			if err != nil {
				t.Fatal(err)
			}
			toks, end := collect(long)
			if len(toks) != 1 || end.Err != nil {
				t.Fatalf("long prompt: %d tokens, %v", len(toks), end.Err)
			}
			steps, prefill := rec.stepRows(), 0
			for i, rows := range steps {
				if len(rows) > budget {
					t.Fatalf("step %d has %d rows, budget %d", i, len(rows), budget)
				}
				if i < before {
					continue
				}
				mine, theirs := 0, map[KV]bool{}
				for _, r := range rows {
					if decoding[r.KV] {
						theirs[r.KV] = true
					} else {
						mine++
					}
				}
				if mine > 0 {
					prefill++
					if len(theirs) != 3 {
						t.Fatalf("step %d prefills %d rows beside %d of the 3 decoding requests", i, mine, len(theirs))
					}
				}
			}
			if min := 300 / (budget - 3) * m.Config.TotalUTSteps; prefill < min {
				t.Errorf("the prompt took %d steps, want at least %d (chunks of at most %d rows)", prefill, min, budget-3)
			}
		})
	}
}

// TestKVGrowsByBlocks: caches grow a block at a time, each block's bytes taken from the budget
// first: the budget always counts exactly the blocks the backend holds, and every cache is
// freed at the end.
func TestKVGrowsByBlocks(t *testing.T) {
	m := loadTiny(t)
	for _, kv := range []KVPolicy{KVFull, KVLast} {
		rec := newRecorder(m)
		e, err := New(m, Options{Backend: rec, Mode: Fast, KVPolicy: kv, Threshold: 0.5})
		if err != nil {
			t.Fatal(err)
		}
		block := rec.KVBlockBytes(kv.slots(rec.R))
		n := 0
		_, err = e.Generate(context.Background(), Request{Prompt: []int{1, 2, 3, 4, 5}, MaxTokens: 60, IgnoreEOS: true}, func(Token) bool {
			n++
			pos := 5 + n // positions in the cache once this token's successor is decoded
			if want := int64((pos+15)/16) * block; e.KVBytes() > want || e.KVBytes()%block != 0 {
				t.Errorf("%v after %d tokens: %d bytes counted, want whole blocks up to %d", kv, n, e.KVBytes(), want)
			}
			return true
		})
		if err != nil {
			t.Fatal(err)
		}
		for i, g := range rec.grows {
			if g != 1 {
				t.Errorf("%v: grow %d added %d blocks, want 1", kv, i, g)
			}
		}
		if len(rec.grows) != (5+59+15)/16 { // the last token is never written
			t.Errorf("%v: %d grows for 64 positions, want %d", kv, len(rec.grows), (5+59+15)/16)
		}
		if e.KVBytes() != 0 || rec.live != 0 {
			t.Errorf("%v: %d bytes counted, %d caches alive after the request", kv, e.KVBytes(), rec.live)
		}
	}
}

// TestBackendFailureEndsRequests injects a failing loop step: the requests in flight end with
// the error, their memory is freed, and the engine serves the next request.
func TestBackendFailureEndsRequests(t *testing.T) {
	m := loadTiny(t)
	rec := newRecorder(m)
	injected := errors.New("injected device fault")
	var once sync.Once
	rec.fail = func(rows []Row) error {
		var err error
		for _, r := range rows {
			if r.Pos == 9 {
				once.Do(func() { err = injected })
			}
		}
		return err
	}
	e, err := New(m, Options{Backend: rec, Mode: Fast, MaxBatch: 4, Threshold: 0.5})
	if err != nil {
		t.Fatal(err)
	}
	running(t, e)
	var chans []<-chan Event
	for i := range 3 {
		ch, err := e.Submit(context.Background(), Request{ID: fmt.Sprint(i), Prompt: []int{1, 2, 3}, MaxTokens: 20, IgnoreEOS: true})
		if err != nil {
			t.Fatal(err)
		}
		chans = append(chans, ch)
	}
	failed := 0
	for _, ch := range chans {
		if _, end := collect(ch); errors.Is(end.Err, injected) {
			failed++
		} else if end.Err != nil {
			t.Errorf("unexpected error %v", end.Err)
		}
	}
	if failed == 0 {
		t.Error("no request saw the injected fault")
	}
	ch, err := e.Submit(context.Background(), Request{ID: "after", Prompt: []int{1, 2}, MaxTokens: 5, IgnoreEOS: true})
	if err != nil {
		t.Fatal(err)
	}
	if toks, end := collect(ch); len(toks) != 5 || end.Err != nil {
		t.Errorf("after the fault: %d tokens, %v", len(toks), end.Err)
	}
	waitUntil(t, func() bool { return e.KVBytes() == 0 })
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// capBackend is the recording test backend with a KV capacity (engine.KVCapacitor).
type capBackend struct {
	*recorder
	capacity int64
}

func (b capBackend) Load(*model.Model, LoadOptions) (Executor, error) { return b, nil }
func (b capBackend) KVCapacity() (int64, error)                       { return b.capacity, nil }

// TestKVBudgetFromBackend: without Options.MaxKVBytes the budget is the backend's KV capacity
// (for the CPU, the container's memory limit less the weights); the option overrides it.
func TestKVBudgetFromBackend(t *testing.T) {
	m := loadTiny(t)
	be := capBackend{newRecorder(m), 123 << 20}
	for _, tc := range []struct {
		opt, want int64
	}{{0, 123 << 20}, {5 << 20, 5 << 20}} {
		e, err := New(m, Options{Backend: be, MaxKVBytes: tc.opt})
		if err != nil {
			t.Fatal(err)
		}
		if got := e.KVLimit(); got != tc.want {
			t.Errorf("MaxKVBytes %d: budget %d, want %d", tc.opt, got, tc.want)
		}
	}
}

// TestCancelledRowsFreeTheirSlots: requests cancelled while their rows are in flight give the
// rows' hidden-state slots back, so slot numbers stay bounded by the batch however many
// requests come and go.
func TestCancelledRowsFreeTheirSlots(t *testing.T) {
	m := loadTiny(t)
	rec := newRecorder(m)
	e, err := New(m, Options{Backend: rec, Mode: Exact, MaxBatch: 2})
	if err != nil {
		t.Fatal(err)
	}
	running(t, e)
	for i := range 60 {
		ctx, cancel := context.WithCancel(context.Background())
		ch, err := e.Submit(ctx, Request{ID: fmt.Sprint(i), Prompt: []int{1, 2, 3}, MaxTokens: 1000, IgnoreEOS: true})
		if err != nil {
			t.Fatal(err)
		}
		<-ch // the first token: the next one's row is in flight
		cancel()
		for range ch {
		}
	}
	top := 0
	for _, rows := range rec.stepRows() {
		for _, r := range rows {
			top = max(top, r.State)
		}
	}
	if top > 8 {
		t.Errorf("state slot %d used after 60 cancelled requests of at most 3 rows, 2 at a time", top)
	}
	waitUntil(t, func() bool { return e.KVBytes() == 0 })
}
