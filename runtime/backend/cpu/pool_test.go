package cpu

import (
	"sync/atomic"
	"testing"
	"time"
)

// TestPoolPhase: every phase runs fn once per worker index, whether the workers are still
// spinning from the last phase, have parked after an idle gap longer than spinFor, or the caller
// has to park for a slow worker; and a phase whose lanes are taken goes through the channel.
func TestPoolPhase(t *testing.T) {
	p := newPool(3)
	defer p.stop()
	const t4 = 4
	for _, c := range []struct {
		name  string
		gap   time.Duration // idle before the phase
		slow  time.Duration // worker 2's task takes this long
		taken bool          // the lanes are held by another phase
	}{
		{"back to back", 0, 0, false},
		{"workers parked", 3 * spinFor, 0, false},
		{"caller parks", 0, 3 * spinFor, false},
		{"both park", 3 * spinFor, 3 * spinFor, false},
		{"lanes taken", 0, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			for round := range 20 {
				time.Sleep(c.gap)
				var calls [t4]atomic.Int32
				if c.taken {
					p.gang.Lock()
				}
				p.phase(t4, func(w, _ int) {
					if w == 2 {
						time.Sleep(c.slow)
					}
					calls[w].Add(1)
				})
				if c.taken {
					p.gang.Unlock()
				}
				for w := range calls {
					if got := calls[w].Load(); got != 1 {
						t.Fatalf("round %d: worker %d ran %d times, want 1", round, w, got)
					}
				}
			}
		})
	}
}
