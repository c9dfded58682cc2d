package host

import (
	"math"
	"testing"

	"github.com/loopserve/loopserve/runtime/model"
)

// kvAt is the key at element i of r (the value at -1-i for negative i), as float32.
func kvAt(r Run, bf16 bool, i int) float32 {
	v := i < 0
	if v {
		i = -1 - i
	}
	switch {
	case bf16 && v:
		return model.BF16ToF32(r.V16[i])
	case bf16:
		return model.BF16ToF32(r.K16[i])
	case v:
		return r.V[i]
	}
	return r.K[i]
}

// TestFreedBlocksAreReused checks that a freed cache's blocks serve later growth of a cache
// of the same size, cleared, and never one of another size.
func TestFreedBlocksAreReused(t *testing.T) {
	for _, bf16 := range []bool{false, true} {
		const layers, kvDim = 2, 8
		cs := NewCaches(layers, kvDim, bf16)
		block := func(slots int) int64 {
			elem := int64(4)
			if bf16 {
				elem = 2
			}
			return int64(slots*layers*2*Block*kvDim) * elem
		}
		first := func(kv int) any {
			c := cs.caches[kv]
			if bf16 {
				return &c.blk16[len(c.blk16)-1][0]
			}
			return &c.blocks[len(c.blocks)-1][0]
		}
		a, err := cs.New(2)
		if err != nil {
			t.Fatal(err)
		}
		if err := cs.Grow(a, 2); err != nil {
			t.Fatal(err)
		}
		k, v := make([]float32, kvDim), make([]float32, kvDim)
		for i := range k {
			k[i], v[i] = float32(i+1), float32(-i-1)
		}
		for pos := range 2 * Block {
			cs.Put(a, 1, 1, pos, k, v)
		}
		used := first(int(a))
		if got, want := cs.Bytes(), 2*block(2); got != want {
			t.Errorf("bf16 %v: Bytes() = %d, want %d", bf16, got, want)
		}
		cs.Free(a)
		if got, want := cs.Bytes(), int64(0); got != want {
			t.Errorf("bf16 %v: Bytes() after Free = %d, want %d", bf16, got, want)
		}
		if got, want := cs.Spare(), 2*block(2); got != want {
			t.Errorf("bf16 %v: Spare() after Free = %d, want %d", bf16, got, want)
		}

		// A cache of one slot has blocks of another size: it allocates.
		one, _ := cs.New(1)
		if err := cs.Grow(one, 1); err != nil {
			t.Fatal(err)
		}
		if got, want := cs.Spare(), 2*block(2); got != want {
			t.Errorf("bf16 %v: Spare() after growing a 1-slot cache = %d, want %d", bf16, got, want)
		}

		b, _ := cs.New(2)
		if err := cs.Grow(b, 1); err != nil {
			t.Fatal(err)
		}
		if got := first(int(b)); got != used {
			t.Errorf("bf16 %v: the new block is not the freed one", bf16)
		}
		if got, want := cs.Spare(), block(2); got != want {
			t.Errorf("bf16 %v: Spare() after reuse = %d, want %d", bf16, got, want)
		}
		// The reused block holds what the freed cache wrote (the engine writes every position
		// before reading it); a poisoning Caches hands out NaN instead.
		r := cs.Runs(nil, b, 1, 1, Block)[0]
		if got := kvAt(r, bf16, kvDim+2); got != 3 {
			t.Errorf("bf16 %v: reused block key = %v, want the freed cache's 3", bf16, got)
		}
		cs.Free(b)
		cs.Poison()
		c, _ := cs.New(2)
		if err := cs.Grow(c, 2); err != nil {
			t.Fatal(err)
		}
		for _, r := range cs.Runs(nil, c, 1, 1, 2*Block) {
			for i := range r.N * kvDim {
				if k, v := kvAt(r, bf16, i), kvAt(r, bf16, -1-i); !math.IsNaN(float64(k)) || !math.IsNaN(float64(v)) {
					t.Fatalf("bf16 %v: poisoned block holds key %v, value %v at %d, want NaN", bf16, k, v, i)
				}
			}
		}
		cs.Free(c)
		b, _ = cs.New(2)
		if err := cs.Grow(b, 1); err != nil {
			t.Fatal(err)
		}
		if got, want := cs.Bytes(), block(1)+block(2); got != want {
			t.Errorf("bf16 %v: Bytes() = %d, want %d", bf16, got, want)
		}
	}
}
