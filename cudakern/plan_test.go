package cudakern

import (
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"testing"
	"unsafe"

	"github.com/google/go-cmp/cmp"
)

// planned checks a planned launch against its kernel's signature and the launch limits, as
// Kernels.Run does before the driver sees it.
func planned(t *testing.T, p Planner, l Launch, err error) Launch {
	t.Helper()
	if err != nil {
		t.Fatalf("planning: %v", err)
	}
	k, ok := lookupKernel(l.Kernel)
	if !ok {
		t.Fatalf("kernel %q is not in the table", l.Kernel)
	}
	limit := defaultShared
	if need := p.sharedNeed(l.Kernel); need > limit {
		limit = need
	}
	if err := l.check(k, limit); err != nil {
		t.Fatalf("%s: %v", l.Kernel, err)
	}
	return l
}

type shape struct {
	Grid, Block Dim3
	Shared      uint32
}

func TestPlannedLaunches(t *testing.T) {
	p := Planner{Spec: Spec{HeadDim: 128, KVPage: 16, ActBF16: true, KVBF16: true}, MaxShared: 227 << 10}
	const ptr = DevicePtr(0x7f0000001000)
	cache := KVCache{KPool: ptr, VPool: ptr, PageTab: ptr, TabOff: ptr, LayerOff: 96}
	attn := Attn{Q: ptr, LdQ: 3 * 2048, Cache: cache, Pos: ptr}
	for _, tc := range []struct {
		name string
		plan func() (Launch, error)
		want shape
	}{
		{"embed", func() (Launch, error) { return p.Embed(ptr, ptr, ptr, 3, 2048, 49152) }, shape{Dim3{3, 1, 1}, Dim3{256, 1, 1}, 0}},
		{"embed narrow", func() (Launch, error) { return p.Embed(ptr, ptr, ptr, 3, 40, 1024) }, shape{Dim3{3, 1, 1}, Dim3{64, 1, 1}, 0}},
		{"rmsnorm", func() (Launch, error) { return p.RMSNorm(ptr, ptr, ptr, 5, 2048, 1e-6) }, shape{Dim3{5, 1, 1}, Dim3{256, 1, 1}, 0}},
		{"cast_rows", func() (Launch, error) { return p.CastRows(ptr, ptr, 4, 2048) }, shape{Dim3{4, 1, 1}, Dim3{256, 1, 1}, 0}},
		{"residual_norm", func() (Launch, error) {
			return p.ResidualNorm(ResidualNorm{H: ptr, O: ptr, WPost: ptr, WNext: ptr, XOut: ptr}, 7, 2048, 1e-6)
		}, shape{Dim3{7, 1, 1}, Dim3{256, 1, 1}, 0}},
		{"residual_norm final", func() (Launch, error) {
			return p.ResidualNorm(ResidualNorm{H: ptr, O: ptr, WPost: ptr, WMid: ptr, WNext: ptr, XOut: ptr, GateW: ptr, GateOut: ptr, GateB: 0.5}, 7, 64, 1e-6)
		}, shape{Dim3{7, 1, 1}, Dim3{64, 1, 1}, 0}},
		{"rope_kv", func() (Launch, error) {
			return p.RoPEKV(RoPEKV{Q: ptr, K: ptr, V: ptr, LdQ: 6144, LdK: 6144, LdV: 6144, Pos: ptr, Cache: cache, RopeCS: ptr, RopeLen: 4096, InvFreq: ptr}, 9, 16, 16)
		}, shape{Dim3{9, 1, 1}, Dim3{128, 1, 1}, 0}},
		{"kv_copy", func() (Launch, error) { return p.KVCopy(ptr, ptr, ptr, ptr, ptr, ptr, ptr, 72, 2048) }, shape{Dim3{72, 1, 1}, Dim3{128, 1, 1}, 0}},
		{"attn_decode", func() (Launch, error) { return p.AttnDecode(attn, ptr, ptr, 0, 4, 16, 16, DecodeSplits(1000), 0.088) }, shape{Dim3{16, 4, 8}, Dim3{128, 1, 1}, 4 * (128 + 128 + 2)}},
		{"attn_decode GQA", func() (Launch, error) { return p.AttnDecode(attn, ptr, ptr, ptr, 2, 16, 4, 1, 0.088) }, shape{Dim3{4, 2, 1}, Dim3{128, 1, 1}, 4 * (4*128 + 4*128 + 8)}},
		{"attn_combine", func() (Launch, error) { return p.AttnCombine(ptr, 2048, ptr, ptr, 0, 4, 16, 8) }, shape{Dim3{16, 4, 1}, Dim3{128, 1, 1}, 0}},
		{"attn_prefill", func() (Launch, error) { return p.AttnPrefill(attn, ptr, 2048, ptr, 32, 16, 16, 0.088) }, shape{Dim3{16, 32, 1}, Dim3{128, 1, 1}, 43328}},
		{"matmul_rows", func() (Launch, error) { return p.MatmulRows(ptr, 6144, ptr, 2048, ptr, 1, 6144, 2048) }, shape{Dim3{768, 1, 1}, Dim3{256, 1, 1}, 0}},
		{"matmul_rows batch", func() (Launch, error) { return p.MatmulRows(ptr, 2048, ptr, 5632, ptr, 17, 2048, 5632) }, shape{Dim3{256, 3, 1}, Dim3{256, 1, 1}, 0}},
		{"swiglu", func() (Launch, error) { return p.SwiGLU(ptr, ptr, 11264, ptr, 11264, 3, 5632) }, shape{Dim3{22, 3, 1}, Dim3{256, 1, 1}, 0}},
		{"exit_decide", func() (Launch, error) { return p.ExitDecide(ptr, ptr, ptr, ptr, ptr, ptr, 300, 4) }, shape{Dim3{3, 1, 1}, Dim3{128, 1, 1}, 0}},
		{"topk", func() (Launch, error) { return p.TopK(ptr, ptr, ptr, ptr, ptr, ptr, 49152, 8, 49152, 20) }, shape{Dim3{8, 1, 1}, Dim3{256, 1, 1}, 0}},
		{"gather_rows", func() (Launch, error) { return p.GatherRows(ptr, ptr, ptr, 5, 2048) }, shape{Dim3{8, 5, 1}, Dim3{256, 1, 1}, 0}},
		{"scatter_rows", func() (Launch, error) { return p.ScatterRows(ptr, ptr, ptr, 5, 100) }, shape{Dim3{1, 5, 1}, Dim3{256, 1, 1}, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, err := tc.plan()
			l = planned(t, p, l, err)
			if diff := cmp.Diff(shape{l.Grid, l.Block, l.Shared}, tc.want); diff != "" {
				t.Errorf("launch shape (-got +want):\n%s", diff)
			}
		})
	}
}

// TestPlannedArgumentValues: the values land in the kernel's parameter order, ints as int32
// and floats as float32 bits in their slots.
func TestPlannedArgumentValues(t *testing.T) {
	p := Planner{Spec: Spec{HeadDim: 64, KVPage: 16}}
	l, err := p.RMSNorm(0x1000, 0x2000, 0x3000, 5, -7, 1e-6)
	if err != nil {
		t.Fatal(err)
	}
	want := []uint64{0x1000, 0x2000, 0x3000, 5, uint64(uint32(0xfffffff9)), uint64(math.Float32bits(1e-6))}
	if diff := cmp.Diff(l.Args.vals, want); diff != "" {
		t.Errorf("argument slots (-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(l.Args.Kinds(), []ParamKind{Ptr, Ptr, Ptr, Int, Int, Float}); diff != "" {
		t.Errorf("kinds (-got +want):\n%s", diff)
	}
}

func TestPlanRejectsShapes(t *testing.T) {
	p := Planner{Spec: Spec{HeadDim: 128, KVPage: 16}}
	attn := Attn{Q: 1, LdQ: 2048, Pos: 1}
	for name, plan := range map[string]func() (Launch, error){
		"no rows":                 func() (Launch, error) { return p.RMSNorm(1, 1, 1, 0, 64, 1e-6) },
		"heads not a multiple":    func() (Launch, error) { return p.RoPEKV(RoPEKV{LdQ: 4096, LdK: 4096, LdV: 4096}, 1, 12, 8) },
		"short q stride":          func() (Launch, error) { return p.RoPEKV(RoPEKV{LdQ: 100, LdK: 4096, LdV: 4096}, 1, 16, 16) },
		"decode rows past grid y": func() (Launch, error) { return p.AttnDecode(attn, 1, 1, 0, 70000, 16, 16, 1, 1) },
		"no splits":               func() (Launch, error) { return p.AttnDecode(attn, 1, 1, 0, 1, 16, 16, 0, 1) },
		"decode shared memory":    func() (Launch, error) { return p.AttnDecode(Attn{LdQ: 64 * 128}, 1, 1, 0, 1, 64, 1, 1, 1) },
		"K not a multiple of 8":   func() (Launch, error) { return p.MatmulRows(1, 64, 1, 100, 1, 1, 64, 100) },
		"x stride not aligned":    func() (Launch, error) { return p.MatmulRows(1, 64, 1, 68, 1, 1, 64, 64) },
		"out stride short":        func() (Launch, error) { return p.MatmulRows(1, 32, 1, 64, 1, 1, 64, 64) },
		"top-k too large":         func() (Launch, error) { return p.TopK(1, 1, 0, 0, 0, 1, 1024, 1, 1024, MaxTopK+1) },
		"top-k past vocab":        func() (Launch, error) { return p.TopK(1, 1, 0, 0, 0, 1, 8, 1, 8, 9) },
		"score without lse":       func() (Launch, error) { return p.TopK(1, 1, 0, 1, 1, 1, 8, 1, 8, 1) },
		"score without output":    func() (Launch, error) { return p.TopK(1, 1, 1, 1, 0, 1, 8, 1, 8, 1) },
		"swiglu stride":           func() (Launch, error) { return p.SwiGLU(1, 1, 10, 1, 100, 1, 100) },
		"residual without x_out": func() (Launch, error) {
			return p.ResidualNorm(ResidualNorm{H: 1, O: 1, WPost: 1, WNext: 1}, 1, 64, 1e-6)
		},
		"residual without gate": func() (Launch, error) {
			return p.ResidualNorm(ResidualNorm{H: 1, O: 1, WPost: 1, GateW: 1}, 1, 64, 1e-6)
		},
		"residual without h": func() (Launch, error) { return p.ResidualNorm(ResidualNorm{O: 1, WPost: 1}, 1, 64, 1e-6) },
		"prefill without opt-in": func() (Launch, error) {
			return Planner{Spec: Spec{HeadDim: 256, KVPage: 16}}.AttnPrefill(Attn{LdQ: 4096}, 1, 4096, 1, 1, 16, 16, 1)
		},
	} {
		_, err := plan()
		if !errors.Is(err, ErrLaunch) {
			t.Errorf("%s: got %v, want ErrLaunch", name, err)
		}
	}
}

func TestLaunchCheck(t *testing.T) {
	k, _ := lookupKernel("swiglu")
	ok := func() Launch {
		l := Launch{Kernel: "swiglu", Grid: Dim3{1, 1, 1}, Block: Dim3{256, 1, 1}}
		l.Args.Ptr(1).Ptr(1).Int(1).Ptr(1).Int(1).Int(1).Int(1)
		return l
	}
	if l := ok(); l.check(k, defaultShared) != nil {
		t.Fatalf("a valid launch failed: %v", l.check(k, defaultShared))
	}
	for name, tc := range map[string]struct {
		edit func(*Launch)
		want string
	}{
		"wrong kind":       {func(l *Launch) { l.Args.kinds[2] = Float }, "swiglu(ptr out, ptr g, int ldg, ptr u, int ldu, int n, int cols)"},
		"missing argument": {func(l *Launch) { l.Args.kinds, l.Args.vals = l.Args.kinds[:6], l.Args.vals[:6] }, "do not match"},
		"int overflow":     {func(l *Launch) { l.Args.Int(1 << 40) }, "does not fit an int32"},
		"empty grid":       {func(l *Launch) { l.Grid.X = 0 }, "empty grid"},
		"grid y":           {func(l *Launch) { l.Grid.Y = 70000 }, "beyond"},
		"block":            {func(l *Launch) { l.Block = Dim3{64, 32, 1} }, "over 1024 threads"},
		"shared":           {func(l *Launch) { l.Shared = defaultShared + 4 }, "shared memory"},
	} {
		l := ok()
		tc.edit(&l)
		err := l.check(k, defaultShared)
		if !errors.Is(err, ErrLaunch) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want ErrLaunch mentioning %q", name, err, tc.want)
		}
	}
}

func TestSharedMemory(t *testing.T) {
	for _, tc := range []struct{ hd, prefill, decodeG1 int }{
		{16, 4 * (16*16 + 32*17 + 32*16 + 16*32 + 48), 4 * (16 + 128 + 2)},
		{128, 43328, 1032},
		{256, 84288, 4 * (256 + 128 + 2)},
	} {
		p := Planner{Spec: Spec{HeadDim: tc.hd, KVPage: 16}}
		if got := p.PrefillShared(); got != tc.prefill {
			t.Errorf("head dim %d: prefill shared %d, want %d", tc.hd, got, tc.prefill)
		}
		if got := p.DecodeShared(1); got != tc.decodeG1 {
			t.Errorf("head dim %d: decode shared %d, want %d", tc.hd, got, tc.decodeG1)
		}
		if need := p.sharedNeed("attn_prefill"); need != tc.prefill || p.sharedNeed("rmsnorm") != 0 {
			t.Errorf("head dim %d: sharedNeed %d", tc.hd, need)
		}
	}
	o, ml := Planner{Spec: Spec{HeadDim: 128}}.DecodeScratch(4, 16, 8)
	if o != 4*4*16*8*128 || ml != 4*4*16*8*2 {
		t.Errorf("decode scratch %d, %d", o, ml)
	}
}

// TestDecodeSplits: the splits cover every position up to maxPos and no split is wholly past it.
func TestDecodeSplits(t *testing.T) {
	for _, tc := range []struct{ pos, want int }{{0, 1}, {127, 1}, {128, 2}, {1000, 8}, {32767, 256}} {
		if got := DecodeSplits(tc.pos); got != tc.want {
			t.Errorf("DecodeSplits(%d) = %d, want %d", tc.pos, got, tc.want)
		}
	}
	for pos := 0; pos < 5000; pos += 7 {
		s := DecodeSplits(pos)
		if s*DecodeChunk <= pos || (s-1)*DecodeChunk > pos {
			t.Fatalf("DecodeSplits(%d) = %d does not cover exactly", pos, s)
		}
	}
}

func TestPlanTiles(t *testing.T) {
	for _, tc := range []struct {
		tab           []int32
		tiles, single []int32
	}{
		{nil, nil, nil},
		{[]int32{0}, nil, []int32{0}},
		{[]int32{0, 8, 16}, nil, []int32{0, 1, 2}},
		{[]int32{0, 0, 0, 8}, []int32{0, 3}, []int32{3}},
		{append(append([]int32{5}, repeat(9, 20)...), 5), []int32{1, 16, 17, 4}, []int32{0, 21}},
	} {
		tiles, single := PlanTiles(tc.tab)
		if diff := cmp.Diff([][]int32{tiles, single}, [][]int32{tc.tiles, tc.single}); diff != "" {
			t.Errorf("PlanTiles(%v) (-got +want):\n%s", tc.tab, diff)
		}
	}
	// Property: every row is attended exactly once; a tile holds 1..16 consecutive rows of one
	// cache; a single row's neighbours are on other caches.
	rng := rand.New(rand.NewPCG(1, 2))
	for range 500 {
		var tab []int32
		for n := rng.IntN(60); len(tab) < n; {
			run := 1 + rng.IntN(40)
			tab = append(tab, repeat(int32(rng.IntN(4)), run)...)
		}
		tiles, single := PlanTiles(tab)
		seen := make([]int, len(tab))
		for k := 0; k < len(tiles); k += 2 {
			r0, nr := int(tiles[k]), int(tiles[k+1])
			if nr < 1 || nr > pfRows {
				t.Fatalf("%v: tile of %d rows", tab, nr)
			}
			for r := r0; r < r0+nr; r++ {
				seen[r]++
				if tab[r] != tab[r0] {
					t.Fatalf("%v: tile at %d mixes caches", tab, r0)
				}
			}
		}
		for _, r := range single {
			seen[r]++
			if (r > 0 && tab[r-1] == tab[r]) || (int(r)+1 < len(tab) && tab[r+1] == tab[r]) {
				t.Fatalf("%v: row %d sent to decode beside rows of its cache", tab, r)
			}
		}
		for r, n := range seen {
			if n != 1 {
				t.Fatalf("%v: row %d attended %d times", tab, r, n)
			}
		}
	}
}

func repeat(v int32, n int) []int32 {
	out := make([]int32, n)
	for k := range out {
		out[k] = v
	}
	return out
}

func TestCacheLayout(t *testing.T) {
	c := CacheLayout{Seqs: 3, Slots: 4, Layers: 2, MaxPages: 10}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if got := c.TableLen(); got != 240 {
		t.Errorf("TableLen %d", got)
	}
	// Every (seq, slot, layer) list starts at its own offset, MaxPages apart, inside the table.
	seen := map[int32]bool{}
	for s := range c.Seqs {
		for sl := range c.Slots {
			for l := range c.Layers {
				off := c.TabOff(s, sl) + int32(c.LayerOff(l))
				if off%10 != 0 || off < 0 || int(off)+c.MaxPages > c.TableLen() || seen[off] {
					t.Fatalf("list (%d, %d, %d) at %d", s, sl, l, off)
				}
				seen[off] = true
			}
		}
	}
	var j KVCopies
	c.AppendCopies(&j, 1, 1, 37, 2, 3, 5, 2) // positions 37, 38 of (1, 1) to 5, 6 of (2, 3), both layers
	s, d := c.TabOff(1, 1), c.TabOff(2, 3)
	want := KVCopies{
		SrcOff: []int32{s, s, s + 10, s + 10}, SrcPos: []int32{37, 38, 37, 38},
		DstOff: []int32{d, d, d + 10, d + 10}, DstPos: []int32{5, 6, 5, 6},
	}
	if diff := cmp.Diff(j, want); diff != "" {
		t.Errorf("AppendCopies (-got +want):\n%s", diff)
	}
	if j.Reset(); j.Len() != 0 {
		t.Errorf("Reset left %d jobs", j.Len())
	}
	if err := (CacheLayout{Seqs: 1 << 12, Slots: 96, Layers: 24, MaxPages: 4096}).Validate(); err == nil {
		t.Error("a table past int32 offsets validated")
	}
	if err := (CacheLayout{Seqs: 1, Slots: 0, Layers: 1, MaxPages: 1}).Validate(); err == nil {
		t.Error("an empty layout validated")
	}
}

// TestRoPETable: the table is what the CPU backend rotates by (float32 angle, float64
// sine and cosine rounded to float32), bit for bit.
func TestRoPETable(t *testing.T) {
	inv := make([]float32, 64)
	for k := range inv {
		inv[k] = float32(1 / math.Pow(1e6, float64(2*k)/128))
	}
	tab := RoPETable(inv, 3000)
	if len(tab) != 3000*64*2 {
		t.Fatalf("table length %d", len(tab))
	}
	for _, p := range []int{0, 1, 17, 2999} {
		for k, f := range inv {
			ang := float32(p) * f
			s, c := math.Sincos(float64(ang))
			if got := [2]float32{tab[(p*64+k)*2], tab[(p*64+k)*2+1]}; got != [2]float32{float32(c), float32(s)} {
				t.Fatalf("position %d pair %d: %v", p, k, got)
			}
		}
	}
}

// TestExitStateLayout: the host mirror has the device struct's layout (six 4-byte fields in
// kernels/select.cu's order), so states copy across as bytes.
func TestExitStateLayout(t *testing.T) {
	var s ExitState
	got := []uintptr{unsafe.Sizeof(s), unsafe.Offsetof(s.Rest), unsafe.Offsetof(s.Cum), unsafe.Offsetof(s.Tau),
		unsafe.Offsetof(s.MaxDepth), unsafe.Offsetof(s.Forced), unsafe.Offsetof(s.Chosen)}
	if diff := cmp.Diff(got, []uintptr{24, 0, 4, 8, 12, 16, 20}); diff != "" {
		t.Errorf("layout (-got +want):\n%s", diff)
	}
	if got, want := NewExitState(0.7, 3, true), (ExitState{Rest: 1, Tau: 0.7, MaxDepth: 3, Forced: 1, Chosen: -1}); got != want {
		t.Errorf("NewExitState = %+v, want %+v", got, want)
	}
	if b := AsBytes([]ExitState{s, s}); len(b) != 48 {
		t.Errorf("AsBytes of two states: %d bytes", len(b))
	}
}
