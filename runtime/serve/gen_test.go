package serve

import (
	"context"
	"hash/fnv"
	"sync"
	"testing"
	"time"

	"github.com/loopserve/loopserve/runtime/engine"
)

// standIn generates a deterministic function of (prompt, seed, position) until the engine's
// constructor lands; newGenerator switches to the real engine then.
type standIn struct {
	mu  sync.Mutex
	tau float64
	per time.Duration
}

func (s *standIn) SetThreshold(t float64) { s.mu.Lock(); s.tau = t; s.mu.Unlock() }
func (s *standIn) Threshold() float64     { s.mu.Lock(); defer s.mu.Unlock(); return s.tau }

func (s *standIn) Submit(ctx context.Context, r engine.Request) (<-chan engine.Event, error) {
	ch := make(chan engine.Event)
	go func() {
		defer close(ch)
		h := fnv.New64a()
		for _, id := range r.Prompt {
			h.Write([]byte{byte(id), byte(id >> 8)})
		}
		base := h.Sum64() ^ r.Sampling.Seed
		if r.Sampling.Temperature == 0 {
			base = h.Sum64()
		}
		for i := range r.MaxTokens {
			if ctx.Err() != nil {
				ch <- engine.Event{Done: true, Err: ctx.Err()}
				return
			}
			time.Sleep(s.per)
			x := base*6364136223846793005 + uint64(i)*1442695040888963407
			x ^= x >> 29
			d := 1 + int(x%4)
			if r.Exit.MaxDepth > 0 {
				d = min(d, r.Exit.MaxDepth)
			}
			cum := make([]float32, d)
			for j := range cum {
				cum[j] = float32(j+1) / 4
			}
			ch <- engine.Event{Token: engine.Token{ID: 20 + int(x>>8%60), Depth: d, Cum: cum}}
		}
		ch <- engine.Event{Done: true, Finish: "length"}
	}()
	return ch, nil
}

// newGenerator returns the generator the tests run against.
func newGenerator(t testing.TB) Generator {
	t.Helper()
	return &standIn{tau: 0.9, per: time.Millisecond}
}
