package engine

import (
	"fmt"
	"sync/atomic"

	"github.com/loopserve/loopserve/runtime/model"
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
	k, v         [][]float32 // per slot: [cap, kvDim]; nil slots when bf16
	k16, v16     [][]uint16  // per slot: [cap, kvDim] bfloat16 bits when bf16
	bf16         bool
	capPositions int
	budget       *kvBudget
}

// elemSize is the bytes of one stored key or value element.
func (c *kvCache) elemSize() int64 {
	if c.bf16 {
		return 2
	}
	return 4
}

// put stores one position's key and value rows [kvDim] in a slot.
func (c *kvCache) put(slot, pos int, k, v []float32) {
	d := c.kvDim
	if !c.bf16 {
		copy(c.k[slot][pos*d:(pos+1)*d], k[:d])
		copy(c.v[slot][pos*d:(pos+1)*d], v[:d])
		return
	}
	dk, dv := c.k16[slot][pos*d:(pos+1)*d], c.v16[slot][pos*d:(pos+1)*d]
	for i := range dk {
		dk[i] = model.F32ToBF16(k[i])
		dv[i] = model.F32ToBF16(v[i])
	}
}

// get reads one position's key and value rows of a slot into k, v [kvDim].
func (c *kvCache) get(slot, pos int, k, v []float32) {
	d := c.kvDim
	if !c.bf16 {
		copy(k[:d], c.k[slot][pos*d:(pos+1)*d])
		copy(v[:d], c.v[slot][pos*d:(pos+1)*d])
		return
	}
	for i := 0; i < d; i++ {
		k[i] = model.BF16ToF32(c.k16[slot][pos*d+i])
		v[i] = model.BF16ToF32(c.v16[slot][pos*d+i])
	}
}

// attnJob points a job at positions [0, n) of a slot.
func (c *kvCache) attnJob(slot, n int, q, out []float32) AttnJob {
	j := AttnJob{Q: q, N: n, Out: out}
	if c.bf16 {
		j.K16, j.V16 = c.k16[slot][:n*c.kvDim], c.v16[slot][:n*c.kvDim]
	} else {
		j.K, j.V = c.k[slot][:n*c.kvDim], c.v[slot][:n*c.kvDim]
	}
	return j
}

func newKVCache(policy KVPolicy, steps, layers, kvDim int, bf16 bool) *kvCache {
	slots := layers
	if policy == KVFull {
		slots = steps * layers
	}
	c := &kvCache{policy: policy, layers: layers, kvDim: kvDim, bf16: bf16}
	if bf16 {
		c.k16, c.v16 = make([][]uint16, slots), make([][]uint16, slots)
	} else {
		c.k, c.v = make([][]float32, slots), make([][]float32, slots)
	}
	return c
}

// slots is the number of (step, layer) caches.
func (c *kvCache) slots() int { return max(len(c.k), len(c.k16)) }

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
	perPos := int64(c.slots()) * 2 * int64(c.kvDim) * c.elemSize()
	newCap := max(n, 2*c.capPositions, 16)
	if !c.budget.take(int64(newCap-c.capPositions) * perPos) {
		newCap = n // doubling does not fit: try exactly what is needed
		if !c.budget.take(int64(newCap-c.capPositions) * perPos) {
			return false
		}
	}
	for s := range c.k {
		c.k[s] = append(make([]float32, 0, newCap*c.kvDim), c.k[s]...)[:newCap*c.kvDim]
		c.v[s] = append(make([]float32, 0, newCap*c.kvDim), c.v[s]...)[:newCap*c.kvDim]
	}
	for s := range c.k16 {
		c.k16[s] = append(make([]uint16, 0, newCap*c.kvDim), c.k16[s]...)[:newCap*c.kvDim]
		c.v16[s] = append(make([]uint16, 0, newCap*c.kvDim), c.v16[s]...)[:newCap*c.kvDim]
	}
	c.capPositions = newCap
	return true
}

// release frees the cache and returns its bytes to the budget.
func (c *kvCache) release() {
	c.budget.give(c.bytes())
	c.k, c.v, c.k16, c.v16, c.capPositions = nil, nil, nil, nil, 0
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
			if c.bf16 {
				copy(c.k16[dst][pos*d:(pos+1)*d], c.k16[src][pos*d:(pos+1)*d])
				copy(c.v16[dst][pos*d:(pos+1)*d], c.v16[src][pos*d:(pos+1)*d])
				continue
			}
			copy(c.k[dst][pos*d:(pos+1)*d], c.k[src][pos*d:(pos+1)*d])
			copy(c.v[dst][pos*d:(pos+1)*d], c.v[src][pos*d:(pos+1)*d])
		}
	}
}

// bytes is the memory held by the cache's allocated positions.
func (c *kvCache) bytes() int64 {
	return int64(c.slots()) * 2 * int64(c.capPositions) * int64(c.kvDim) * c.elemSize()
}

// usedBytes is the memory the first n positions take.
func (c *kvCache) usedBytes(n int) int64 {
	return int64(c.slots()) * 2 * int64(n) * int64(c.kvDim) * c.elemSize()
}
