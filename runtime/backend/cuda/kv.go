package cuda

import (
	"errors"
	"fmt"
	"sync"

	"github.com/loopserve/loopserve/runtime/engine"
)

// ErrKVFull: the device's KV pool has no free pages for a cache's growth.
var ErrKVFull = errors.New("device KV pool exhausted")

// pages hands out the pages of the executor's KV pools (one page: Block positions of one
// cache slot and layer, keys in the K pool and values in the V pool at the same index). Safe
// for concurrent use: streams share the pools.
type pages struct {
	mu   sync.Mutex
	free []int32
}

func newPages(n int) *pages {
	p := &pages{free: make([]int32, n)}
	for i := range p.free {
		p.free[i] = int32(n - 1 - i) // page 0 is handed out first
	}
	return p
}

// take returns n pages, or ErrKVFull taking none.
func (p *pages) take(n int) ([]int32, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n > len(p.free) {
		return nil, fmt.Errorf("%d pages wanted, %d free: %w", n, len(p.free), ErrKVFull)
	}
	out := make([]int32, n)
	for i := range out {
		out[i] = p.free[len(p.free)-1-i]
	}
	p.free = p.free[:len(p.free)-n]
	return out, nil
}

func (p *pages) give(ps []int32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.free = append(p.free, ps...)
}

func (p *pages) available() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.free)
}

// table is a stream's page table, mirrored on the host: one region of layers×maxPages
// entries per (cache, step-slot), a region's list for layer l at l×maxPages. A row's tab_off
// is its region's start; a layer's launches add l×maxPages. Regions are reused after FreeKV.
// The host mirror is the truth; dirty entries go to the device before the next launch.
type table struct {
	layers, maxPages int
	tab              []int32 // the mirror
	caches           []*kvCache
	freeKV           []engine.KV
	freeRegion       []int
	regions          int
	dirtyLo, dirtyHi int // entries [lo, hi) to upload
}

type kvCache struct {
	slots   int
	regions []int // by step-slot
	blocks  int
	pages   []int32 // every page the cache holds
}

func newTable(layers, maxPages int) *table {
	return &table{layers: layers, maxPages: maxPages, dirtyLo: -1}
}

func (t *table) regionLen() int { return t.layers * t.maxPages }

// maxPositions is the most positions one cache holds.
func (t *table) maxPositions() int { return t.maxPages * kvPage }

func (t *table) get(kv engine.KV) (*kvCache, error) {
	if int(kv) < 0 || int(kv) >= len(t.caches) || t.caches[kv] == nil {
		return nil, fmt.Errorf("KV handle %d is not a live cache of this stream", kv)
	}
	return t.caches[kv], nil
}

func (t *table) newKV(slots int) (engine.KV, error) {
	if slots <= 0 || slots > 64 {
		return 0, fmt.Errorf("a KV cache of %d slots, want 1..64", slots)
	}
	c := &kvCache{slots: slots}
	for range slots {
		r := t.regions
		if n := len(t.freeRegion); n > 0 {
			r, t.freeRegion = t.freeRegion[n-1], t.freeRegion[:n-1]
		} else {
			t.regions++
			t.tab = append(t.tab, make([]int32, t.regionLen())...)
		}
		c.regions = append(c.regions, r)
	}
	if n := len(t.freeKV); n > 0 {
		id := t.freeKV[n-1]
		t.freeKV = t.freeKV[:n-1]
		t.caches[id] = c
		return id, nil
	}
	t.caches = append(t.caches, c)
	return engine.KV(len(t.caches) - 1), nil
}

// grow appends blocks to kv with pages from p: slots×layers pages per block.
func (t *table) grow(p *pages, kv engine.KV, blocks int) error {
	c, err := t.get(kv)
	if err != nil {
		return err
	}
	if blocks < 0 || c.blocks+blocks > t.maxPages {
		return fmt.Errorf("growing a cache of %d positions by %d blocks: at most %d positions", c.blocks*kvPage, blocks, t.maxPositions())
	}
	got, err := p.take(blocks * c.slots * t.layers)
	if err != nil {
		return err
	}
	i := 0
	for b := c.blocks; b < c.blocks+blocks; b++ {
		for _, r := range c.regions {
			for l := range t.layers {
				at := r*t.regionLen() + l*t.maxPages + b
				t.tab[at] = got[i]
				t.dirty(at)
				i++
			}
		}
	}
	c.blocks += blocks
	c.pages = append(c.pages, got...)
	return nil
}

func (t *table) dirty(at int) {
	if t.dirtyLo < 0 {
		t.dirtyLo, t.dirtyHi = at, at+1
		return
	}
	t.dirtyLo, t.dirtyHi = min(t.dirtyLo, at), max(t.dirtyHi, at+1)
}

// free returns kv's pages to p and its regions and handle for reuse.
func (t *table) free(p *pages, kv engine.KV) error {
	c, err := t.get(kv)
	if err != nil {
		return err
	}
	p.give(c.pages)
	t.freeRegion = append(t.freeRegion, c.regions...)
	t.caches[kv] = nil
	t.freeKV = append(t.freeKV, kv)
	return nil
}

// off is the tab_off of (kv, slot), checking that position pos is within the cache.
func (t *table) off(kv engine.KV, slot, pos int) (int32, error) {
	c, err := t.get(kv)
	if err != nil {
		return 0, err
	}
	if slot < 0 || slot >= c.slots {
		return 0, fmt.Errorf("slot %d of a cache of %d slots", slot, c.slots)
	}
	if pos < 0 || pos >= c.blocks*kvPage {
		return 0, fmt.Errorf("position %d of a cache of %d positions", pos, c.blocks*kvPage)
	}
	return int32(c.regions[slot] * t.regionLen()), nil
}

// copies is kv_copy's job list for the engine's copies (a job per position and layer; the
// offsets include the layer), in waves: a wave holds no job that
// reads a position an earlier job of the wave writes, nor two writes of one position, so each
// wave runs as one parallel launch and the waves in order give the copies' sequential effect.
type copies struct {
	srcOff, srcPos, dstOff, dstPos []int32
	waves                          []int // end index of each wave
}

type kvPos struct{ off, pos int32 }

func (t *table) copies(cs []engine.KVCopy) (copies, error) {
	var j copies
	written := map[kvPos]bool{}
	for _, c := range cs {
		if c.N < 0 {
			return j, fmt.Errorf("a KV copy of %d positions", c.N)
		}
		if c.N == 0 {
			continue
		}
		so, err := t.off(c.Src, c.SrcSlot, c.SrcPos+c.N-1)
		if err == nil {
			_, err = t.off(c.Src, c.SrcSlot, c.SrcPos)
		}
		if err != nil {
			return j, fmt.Errorf("KV copy source: %w", err)
		}
		do, err := t.off(c.Dst, c.DstSlot, c.DstPos+c.N-1)
		if err == nil {
			_, err = t.off(c.Dst, c.DstSlot, c.DstPos)
		}
		if err != nil {
			return j, fmt.Errorf("KV copy destination: %w", err)
		}
		for i := range c.N {
			s, d := kvPos{so, int32(c.SrcPos + i)}, kvPos{do, int32(c.DstPos + i)}
			if s == d {
				continue
			}
			if written[s] || written[d] {
				j.waves = append(j.waves, len(j.srcOff))
				clear(written)
			}
			written[d] = true
			for l := range t.layers {
				lo := int32(l * t.maxPages)
				j.srcOff, j.srcPos = append(j.srcOff, s.off+lo), append(j.srcPos, s.pos)
				j.dstOff, j.dstPos = append(j.dstOff, d.off+lo), append(j.dstPos, d.pos)
			}
		}
	}
	if len(j.srcOff) > 0 {
		j.waves = append(j.waves, len(j.srcOff))
	}
	return j, nil
}
