package engine

import (
	"fmt"
	"sync/atomic"
)

// KVPolicy chooses how decode tokens share key/value caches across loop steps (DESIGN §5).
type KVPolicy int

const (
	// KVFull keeps one cache per (loop step, layer), index step×layers+layer, as the reference
	// model does. A token that exits at step d fills the later steps' slots from step d.
	KVFull KVPolicy = iota
	// KVLast keeps one cache per layer holding the last loop step a token executed: R× less
	// memory, at a small quality cost (Ouro paper).
	KVLast
)

// String returns "full" or "last".
func (p KVPolicy) String() string {
	switch p {
	case KVFull:
		return "full"
	case KVLast:
		return "last"
	}
	return fmt.Sprintf("KVPolicy(%d)", int(p))
}

// ParseKVPolicy parses "full" or "last".
func ParseKVPolicy(s string) (KVPolicy, error) {
	switch s {
	case "full", "":
		return KVFull, nil
	case "last":
		return KVLast, nil
	}
	return 0, fmt.Errorf("kv policy %q (want full or last): %w", s, ErrInvalidOptions)
}

// kvBudget bounds the bytes all caches of an engine may hold, so no request can run the
// process out of memory; it also measures what the caches hold. Safe for concurrent use; a
// nil *kvBudget (caches outside an engine) is unlimited.
type kvBudget struct {
	limit int64
	used  atomic.Int64
}

// take reserves n bytes, reporting false (and reserving nothing) past the limit.
func (b *kvBudget) take(n int64) bool {
	if b == nil {
		return true
	}
	if b.used.Add(n) > b.limit {
		b.used.Add(-n)
		return false
	}
	return true
}

func (b *kvBudget) give(n int64) {
	if b != nil {
		b.used.Add(-n)
	}
}

// kvCache is one sequence's keys and values. Positions are written by rows of an iteration;
// the sequence tracks how many are valid context.
type kvCache struct {
	policy       KVPolicy
	layers       int
	kvDim        int
	k, v         [][]float32 // per slot: [cap, kvDim]
	capPositions int
	budget       *kvBudget
}

func newKVCache(policy KVPolicy, steps, layers, kvDim int) *kvCache {
	slots := layers
	if policy == KVFull {
		slots = steps * layers
	}
	return &kvCache{policy: policy, layers: layers, kvDim: kvDim, k: make([][]float32, slots), v: make([][]float32, slots)}
}

func (c *kvCache) slot(step, layer int) int {
	if c.policy == KVFull {
		return step*c.layers + layer
	}
	return layer
}

// reserve makes room for positions [0, n), keeping the content; it reports false when the
// engine's KV budget cannot hold them.
func (c *kvCache) reserve(n int) bool {
	if n <= c.capPositions {
		return true
	}
	perPos := int64(len(c.k)) * 2 * int64(c.kvDim) * 4
	newCap := max(n, 2*c.capPositions, 16)
	if !c.budget.take(int64(newCap-c.capPositions) * perPos) {
		newCap = n // doubling does not fit: try exactly what is needed
		if !c.budget.take(int64(newCap-c.capPositions) * perPos) {
			return false
		}
	}
	for s := range c.k {
		k := make([]float32, newCap*c.kvDim)
		copy(k, c.k[s])
		c.k[s] = k
		v := make([]float32, newCap*c.kvDim)
		copy(v, c.v[s])
		c.v[s] = v
	}
	c.capPositions = newCap
	return true
}

// release frees the cache and returns its bytes to the budget.
func (c *kvCache) release() {
	c.budget.give(c.bytes())
	c.k, c.v, c.capPositions = nil, nil, 0
}

// copyStep copies position pos of step `from` into the slots of steps (from, to) for every
// layer: how a token that exited at `from` fills the steps it skipped (KVFull only).
func (c *kvCache) copyStep(pos, from, to int) {
	if c.policy != KVFull {
		return
	}
	d := c.kvDim
	for l := 0; l < c.layers; l++ {
		src := c.slot(from, l)
		for t := from + 1; t < to; t++ {
			dst := c.slot(t, l)
			copy(c.k[dst][pos*d:(pos+1)*d], c.k[src][pos*d:(pos+1)*d])
			copy(c.v[dst][pos*d:(pos+1)*d], c.v[src][pos*d:(pos+1)*d])
		}
	}
}

// bytes is the memory held by the cache's allocated positions.
func (c *kvCache) bytes() int64 {
	return int64(len(c.k)) * 2 * int64(c.capPositions) * int64(c.kvDim) * 4
}

// usedBytes is the memory the first n positions take.
func (c *kvCache) usedBytes(n int) int64 {
	return int64(len(c.k)) * 2 * int64(n) * int64(c.kvDim) * 4
}
