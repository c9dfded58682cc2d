// Package host holds what backends that compute in host memory share beside their kernels:
// paged KV caches (Caches) and hidden-state slots (States), behind the engine's handles.
package host

import (
	"fmt"
	"math"

	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// Block is the positions of one KV block: a multiple of 16 so vector kernels see whole
// 16-position groups in every block but the last.
const Block = 16

// Caches are the KV caches of one stream, paged in blocks of Block positions. A block of a
// cache with S step-slots holds [S, layers, 2 (keys, values), Block, kvDim] elements, float32
// or bfloat16 bits: one allocation per block, so a cache grows without copying and a
// (slot, layer) run of Block positions is contiguous for the attention kernels. Not safe for
// concurrent use (a stream's).
//
// A freed cache's blocks stay with the Caches (spare, by size) and later growth takes them,
// as they are, before allocating: the memory held is the most blocks ever in use at once (so
// at most the engine's KV budget), and a request's cache grows into pages already mapped, not
// through a page fault per 4 KiB of a fresh allocation (a 1.4B-shape block is 25 MB: 6,000
// faults in the middle of decoding; clearing it costs as much here). A reused block holds
// another request's keys and values: the engine writes every position before any step reads
// it (its contract), and Poison turns a breach of that into NaN logits in tests.
type Caches struct {
	layers, kvDim int
	bf16          bool
	caches        []*cache // by handle
	free          []engine.KV
	spare         map[int][][]float32 // [elements] freed float32 blocks
	spare16       map[int][][]uint16  // [elements] freed bfloat16 blocks
	poison        bool
}

// Poison makes every block growth appends NaN throughout, new or spare, so that a step
// reading a position its cache never wrote yields NaN instead of a stale value or zero (tests).
func (cs *Caches) Poison() { cs.poison = true }

type cache struct {
	slots  int
	blocks [][]float32 // float32 caches
	blk16  [][]uint16  // bfloat16 caches
}

// NewCaches returns empty caches for layers layers of kvDim-wide keys and values.
func NewCaches(layers, kvDim int, bf16 bool) *Caches {
	return &Caches{layers: layers, kvDim: kvDim, bf16: bf16, spare: map[int][][]float32{}, spare16: map[int][][]uint16{}}
}

// BlockBytes is the memory of one block of a cache with slots step-slots.
func BlockBytes(c model.Config, slots int, bf16 bool) int64 {
	elem := int64(4)
	if bf16 {
		elem = 2
	}
	return int64(slots) * int64(c.NumHiddenLayers) * 2 * Block * int64(c.KVDim()) * elem
}

// BF16 reports whether keys and values are stored as bfloat16.
func (cs *Caches) BF16() bool { return cs.bf16 }

// New makes an empty cache of slots step-slots.
func (cs *Caches) New(slots int) (engine.KV, error) {
	if slots <= 0 {
		return 0, fmt.Errorf("a KV cache of %d slots", slots)
	}
	c := &cache{slots: slots}
	if n := len(cs.free); n > 0 {
		id := cs.free[n-1]
		cs.free = cs.free[:n-1]
		cs.caches[id] = c
		return id, nil
	}
	cs.caches = append(cs.caches, c)
	return engine.KV(len(cs.caches) - 1), nil
}

func (cs *Caches) get(kv engine.KV) *cache {
	if int(kv) < 0 || int(kv) >= len(cs.caches) || cs.caches[kv] == nil {
		panic(fmt.Sprintf("KV handle %d is not a live cache of this stream", kv))
	}
	return cs.caches[kv]
}

// Grow appends blocks to kv: spare blocks first, then new (zeroed) ones.
func (cs *Caches) Grow(kv engine.KV, blocks int) error {
	c := cs.get(kv)
	n := c.slots * cs.layers * 2 * Block * cs.kvDim
	for range blocks {
		if cs.bf16 {
			c.blk16 = append(c.blk16, take(cs.spare16, n, cs.poison, model.F32ToBF16(float32(math.NaN()))))
		} else {
			c.blocks = append(c.blocks, take(cs.spare, n, cs.poison, float32(math.NaN())))
		}
	}
	return nil
}

// take returns a spare block of n elements or a new one, filled with nan if poison.
func take[T float32 | uint16](spare map[int][][]T, n int, poison bool, nan T) []T {
	var b []T
	if s := spare[n]; len(s) > 0 {
		b = s[len(s)-1]
		s[len(s)-1] = nil
		spare[n] = s[:len(s)-1]
	} else {
		b = make([]T, n)
	}
	if poison {
		for i := range b {
			b[i] = nan
		}
	}
	return b
}

// Free drops kv, keeping its blocks for later growth; its handle is reused.
func (cs *Caches) Free(kv engine.KV) {
	c := cs.get(kv)
	for _, b := range c.blocks {
		cs.spare[len(b)] = append(cs.spare[len(b)], b)
	}
	for _, b := range c.blk16 {
		cs.spare16[len(b)] = append(cs.spare16[len(b)], b)
	}
	cs.caches[kv] = nil
	cs.free = append(cs.free, kv)
}

// Positions is the capacity of kv.
func (cs *Caches) Positions(kv engine.KV) int {
	c := cs.get(kv)
	return Block * max(len(c.blocks), len(c.blk16))
}

// offset is where the keys (v = 0) or values (v = 1) of (slot, layer) start in a block.
func (cs *Caches) offset(slot, layer, v int) int {
	return ((slot*cs.layers+layer)*2 + v) * Block * cs.kvDim
}

// Run is a contiguous run of positions of one (slot, layer): keys and values [n, kvDim], as
// float32 (K, V) or bfloat16 bits (K16, V16).
type Run struct {
	K, V     []float32
	K16, V16 []uint16
	N        int
}

// Runs appends the runs covering positions [0, n) of (slot, layer) of kv: one per block.
func (cs *Caches) Runs(dst []Run, kv engine.KV, slot, layer, n int) []Run {
	c := cs.get(kv)
	d := cs.kvDim
	ko, vo := cs.offset(slot, layer, 0), cs.offset(slot, layer, 1)
	for b := 0; b*Block < n; b++ {
		m := min(Block, n-b*Block)
		if cs.bf16 {
			blk := c.blk16[b]
			dst = append(dst, Run{K16: blk[ko : ko+m*d], V16: blk[vo : vo+m*d], N: m})
		} else {
			blk := c.blocks[b]
			dst = append(dst, Run{K: blk[ko : ko+m*d], V: blk[vo : vo+m*d], N: m})
		}
	}
	return dst
}

// Put stores one position's key and value rows [kvDim] in (slot, layer) of kv, rounding to
// bfloat16 in a bfloat16 cache.
func (cs *Caches) Put(kv engine.KV, slot, layer, pos int, k, v []float32) {
	cs.PutCols(kv, slot, layer, pos, 0, k[:cs.kvDim], v[:cs.kvDim])
}

// PutCols stores columns [c0, c0+len(k)) of one position's key and value rows: a part of the
// heads, so that goroutines writing disjoint heads of a position may run at once.
func (cs *Caches) PutCols(kv engine.KV, slot, layer, pos, c0 int, k, v []float32) {
	c := cs.get(kv)
	d := cs.kvDim
	b, p := pos/Block, pos%Block
	ko, vo := cs.offset(slot, layer, 0)+p*d+c0, cs.offset(slot, layer, 1)+p*d+c0
	if cs.bf16 {
		blk := c.blk16[b]
		for i := range k {
			blk[ko+i] = model.F32ToBF16(k[i])
			blk[vo+i] = model.F32ToBF16(v[i])
		}
		return
	}
	blk := c.blocks[b]
	copy(blk[ko:ko+len(k)], k)
	copy(blk[vo:vo+len(v)], v)
}

// Copy performs the copies in order.
func (cs *Caches) Copy(copies []engine.KVCopy) {
	d := cs.kvDim
	for _, cp := range copies {
		src, dst := cs.get(cp.Src), cs.get(cp.Dst)
		for i := range cp.N {
			sp, dp := cp.SrcPos+i, cp.DstPos+i
			for l := range cs.layers {
				for v := range 2 {
					so := cs.offset(cp.SrcSlot, l, v) + sp%Block*d
					do := cs.offset(cp.DstSlot, l, v) + dp%Block*d
					if cs.bf16 {
						copy(dst.blk16[dp/Block][do:do+d], src.blk16[sp/Block][so:so+d])
					} else {
						copy(dst.blocks[dp/Block][do:do+d], src.blocks[sp/Block][so:so+d])
					}
				}
			}
		}
	}
}

// Bytes is the memory of the live caches' blocks (not the spare ones: Spare).
func (cs *Caches) Bytes() int64 {
	var n int64
	for _, c := range cs.caches {
		if c == nil {
			continue
		}
		n += int64(len(c.blocks))*int64(len(firstF(c.blocks)))*4 + int64(len(c.blk16))*int64(len(firstU(c.blk16)))*2
	}
	return n
}

// Spare is the memory of the blocks freed caches left for later growth.
func (cs *Caches) Spare() int64 {
	var n int64
	for size, bs := range cs.spare {
		n += int64(size) * int64(len(bs)) * 4
	}
	for size, bs := range cs.spare16 {
		n += int64(size) * int64(len(bs)) * 2
	}
	return n
}

func firstF(b [][]float32) []float32 {
	if len(b) == 0 {
		return nil
	}
	return b[0]
}

func firstU(b [][]uint16) []uint16 {
	if len(b) == 0 {
		return nil
	}
	return b[0]
}

// States are a stream's hidden-state slots: [slots, hidden], grown to the largest index used.
type States struct {
	H int
	h []float32
}

// Row returns slot i's state [H], growing the slots to hold it.
func (s *States) Row(i int) []float32 {
	if need := (i + 1) * s.H; need > len(s.h) {
		s.h = append(s.h, make([]float32, max(need, 2*len(s.h))-len(s.h))...)
	}
	return s.h[i*s.H : (i+1)*s.H]
}

// AttnJob is one query row attending over the positions of its runs, in order.
type AttnJob struct {
	Q    []float32 // [heads·headDim]
	Runs []Run     // the keys and values of positions [0, N), a run per block
	Out  []float32 // [heads·headDim]
}

// N is the positions the job attends.
func (j *AttnJob) N() int {
	n := 0
	for _, r := range j.Runs {
		n += r.N
	}
	return n
}

// Contiguous is one run of n positions of float32 keys and values [n, kvDim] (tests and
// benchmarks).
func Contiguous(k, v []float32, n int) []Run { return []Run{{K: k, V: v, N: n}} }
