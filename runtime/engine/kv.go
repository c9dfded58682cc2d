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

// slots is the step-slots of a decode cache under p.
func (p KVPolicy) slots(R int) int {
	if p == KVFull {
		return R
	}
	return 1
}

// slot is the step-slot loop step t writes under p.
func (p KVPolicy) slot(t int) int {
	if p == KVFull {
		return t
	}
	return 0
}

// kvBudget bounds the bytes all caches of an engine may hold, so no request can run the
// process (or the device) out of memory; it also measures what the caches hold. Safe for
// concurrent use.
type kvBudget struct {
	limit int64
	used  atomic.Int64
}

// take reserves n bytes, reporting false (and reserving nothing) past the limit.
func (b *kvBudget) take(n int64) bool {
	if b.used.Add(n) > b.limit {
		b.used.Add(-n)
		return false
	}
	return true
}

func (b *kvBudget) give(n int64) { b.used.Add(-n) }

// kvCache is the engine's side of one backend cache: its handle on the stream, the blocks it
// holds and the budget they are counted in. The backend owns the memory; the cache grows a
// block at a time, each block's bytes taken from the budget before the backend allocates it,
// so growth never holds memory the budget has not granted.
type kvCache struct {
	st         Stream
	id         KV
	live       bool // id names a cache of st
	slots      int
	block      int   // positions per block
	blockBytes int64 // bytes per block
	blocks     int
	budget     *kvBudget
}

func newKVCache(st Stream, ex Executor, slots int, budget *kvBudget) *kvCache {
	return &kvCache{st: st, slots: slots, block: ex.KVBlock(), blockBytes: ex.KVBlockBytes(slots), budget: budget}
}

// bytes is the memory the cache holds.
func (c *kvCache) bytes() int64 { return int64(c.blocks) * c.blockBytes }

// reserve makes room for positions [0, n), keeping the content. It reports false when the
// budget cannot grant the blocks, and an error when the backend cannot allocate them; either
// way the cache is left as it was.
func (c *kvCache) reserve(n int) (bool, error) {
	need := (n + c.block - 1) / c.block
	if need <= c.blocks {
		return true, nil
	}
	add := need - c.blocks
	bytes := int64(add) * c.blockBytes
	if !c.budget.take(bytes) {
		return false, nil
	}
	if !c.live {
		id, err := c.st.NewKV(c.slots)
		if err != nil {
			c.budget.give(bytes)
			return false, fmt.Errorf("making a KV cache: %w", err)
		}
		c.id, c.live = id, true
	}
	if err := c.st.GrowKV(c.id, add); err != nil {
		c.budget.give(bytes)
		return false, fmt.Errorf("growing a KV cache to %d positions: %w", need*c.block, err)
	}
	c.blocks = need
	return true, nil
}

// release frees the cache and returns its bytes to the budget.
func (c *kvCache) release() {
	if c.live {
		c.st.FreeKV(c.id)
		c.live = false
	}
	c.budget.give(c.bytes())
	c.blocks = 0
}

// fill copies position pos of step-slot from into the slots of steps (from, R) under KVFull:
// how a token that exited at step from fills the steps it skipped.
func (c *kvCache) fill(pos, from, R int, copies []KVCopy) []KVCopy {
	for t := from + 1; t < R; t++ {
		copies = append(copies, KVCopy{Dst: c.id, Src: c.id, DstSlot: t, SrcSlot: from, DstPos: pos, SrcPos: pos, N: 1})
	}
	return copies
}
