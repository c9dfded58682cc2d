package cudakern

// Tests that need a CUDA device. They skip, saying why, where the driver or a device is
// missing (every CPU machine, CI included); on a GPU host they run the kernels against plain
// Go computations of the same math.

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"

	"github.com/loopserve/loopserve/runtime/model"
)

type gpu struct {
	d     *Driver
	ctx   *Context
	s     *Stream
	props Props
}

func testGPU(t *testing.T) *gpu {
	t.Helper()
	d, err := LoadDriver()
	if err != nil {
		t.Skipf("no CUDA driver (%v): the device tests run on GPU hosts", err)
	}
	dev, err := d.Device(0)
	if errors.Is(err, ErrNoDevice) {
		t.Skipf("the CUDA driver sees no device: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	props, err := dev.Props()
	if err != nil {
		t.Fatal(err)
	}
	ctx, err := dev.RetainPrimaryContext()
	if err != nil {
		t.Fatal(err)
	}
	unbind, err := ctx.Bind()
	if err != nil {
		t.Fatal(err)
	}
	s, err := d.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = s.Destroy()
		unbind()
		_ = ctx.Release()
	})
	return &gpu{d: d, ctx: ctx, s: s, props: props}
}

func upload[T any](t *testing.T, g *gpu, v []T) DevicePtr {
	t.Helper()
	b := AsBytes(v)
	p, err := g.d.Alloc(max(len(b), 4))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.d.Free(p) })
	if err := g.d.CopyToDevice(p, b); err != nil {
		t.Fatal(err)
	}
	return p
}

func download[T any](t *testing.T, g *gpu, p DevicePtr, n int) []T {
	t.Helper()
	if err := g.s.Synchronize(); err != nil {
		t.Fatal(err)
	}
	out := make([]T, n)
	if err := g.d.CopyFromDevice(AsBytes(out), p); err != nil {
		t.Fatal(err)
	}
	return out
}

func (g *gpu) kernels(t *testing.T, spec Spec) *Kernels {
	t.Helper()
	nv, err := LoadNVRTC()
	if err != nil {
		t.Skipf("a GPU but no NVRTC: %v", err)
	}
	target, err := nv.Target(g.props.ComputeCapability)
	if err != nil {
		t.Fatal(err)
	}
	imgs, err := Build(context.Background(), nv, &Cache{Dir: t.TempDir()}, spec, target)
	if err != nil {
		t.Fatal(err)
	}
	k, err := LoadKernels(g.d, imgs, Planner{Spec: spec, MaxShared: g.props.MaxSharedOptin})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Unload)
	return k
}

func run(t *testing.T, g *gpu, k *Kernels, l Launch, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Run(g.s, l); err != nil {
		t.Fatal(err)
	}
}

func randF32(rng *rand.Rand, n int, scale float32) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = (rng.Float32()*2 - 1) * scale
	}
	return v
}

func toBF16(v []float32) []uint16 {
	out := make([]uint16, len(v))
	for i, f := range v {
		out[i] = model.F32ToBF16(f)
	}
	return out
}

func near(t *testing.T, what string, got, want []float32, tol float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	for i := range got {
		if d := math.Abs(float64(got[i]) - float64(want[i])); d > tol*math.Max(1, math.Abs(float64(want[i]))) || math.IsNaN(float64(got[i])) {
			t.Fatalf("%s[%d] = %v, want %v (tolerance %g)", what, i, got[i], want[i], tol)
		}
	}
}

func TestDeviceMemory(t *testing.T) {
	g := testGPU(t)
	if g.props.Name == "" || g.props.ComputeCapability < 50 || g.props.SMs < 1 || g.props.TotalMem == 0 {
		t.Fatalf("device properties %+v", g.props)
	}
	t.Logf("%s: sm_%d, %d SMs, %.1f GiB, %.0f GB/s peak, driver %d", g.props.Name, g.props.ComputeCapability,
		g.props.SMs, float64(g.props.TotalMem)/(1<<30), g.props.PeakBandwidth()/1e9, g.d.Version())
	src := randF32(rand.New(rand.NewPCG(1, 1)), 1000, 1)
	p := upload(t, g, src)
	if got := download[float32](t, g, p, len(src)); !slices.Equal(got, src) {
		t.Fatal("synchronous round trip changed the data")
	}
	pin, err := g.d.AllocPinned(4000)
	if err != nil {
		t.Fatal(err)
	}
	defer g.d.FreePinned(pin)
	q, err := g.d.Alloc(4000)
	if err != nil {
		t.Fatal(err)
	}
	defer g.d.Free(q)
	copy(pin.Float32s(), src)
	start, _ := g.d.NewEvent(true)
	end, _ := g.d.NewEvent(true)
	defer start.Destroy()
	defer end.Destroy()
	if err := errors.Join(start.Record(g.s), g.s.CopyToDeviceAsync(q, pin), g.s.Fill32Async(q, math.Float32bits(7), 10),
		g.s.CopyFromDeviceAsync(pin, q), end.Record(g.s), end.Synchronize()); err != nil {
		t.Fatal(err)
	}
	if done, err := end.Done(); !done || err != nil {
		t.Errorf("event done %v, %v after Synchronize", done, err)
	}
	ms, err := end.Elapsed(start)
	if err != nil || ms < 0 {
		t.Errorf("elapsed %v ms, %v", ms, err)
	}
	want := append(slices.Repeat([]float32{7}, 10), src[10:]...)
	if got := pin.Float32s(); !slices.Equal(got, want) {
		t.Error("asynchronous round trip with a fill did not return the data")
	}
	free, total, err := g.ctx.MemInfo()
	if err != nil || free == 0 || free > total {
		t.Errorf("MemInfo %d / %d, %v", free, total, err)
	}
}

// TestDeviceKernelsF32 runs every kernel in the check mode (f32 activations and KV) on small
// shapes, against float64 Go computations.
func TestDeviceKernelsF32(t *testing.T) {
	g := testGPU(t)
	spec := Spec{HeadDim: 16, KVPage: 4}
	k := g.kernels(t, spec)
	rng := rand.New(rand.NewPCG(7, 8))
	const eps = 1e-6

	t.Run("embed", func(t *testing.T) {
		const V, C = 50, 40
		table := toBF16(randF32(rng, V*C, 1))
		ids := []int32{3, -1, 49, 50}
		h := upload(t, g, make([]float32, len(ids)*C))
		l, err := k.Embed(h, upload(t, g, table), upload(t, g, ids), len(ids), C, V)
		run(t, g, k, l, err)
		got := download[float32](t, g, h, len(ids)*C)
		for r, id := range ids {
			for c := range C {
				want := float32(0)
				if id >= 0 && id < V {
					want = model.BF16ToF32(table[int(id)*C+c])
				}
				if got[r*C+c] != want {
					t.Fatalf("row %d (id %d) col %d: %v, want %v", r, id, c, got[r*C+c], want)
				}
			}
		}
	})

	rmsRef := func(x, w []float32) []float32 {
		var ss float64
		for _, v := range x {
			ss += float64(v) * float64(v)
		}
		s := 1 / math.Sqrt(ss/float64(len(x))+eps)
		out := make([]float32, len(x))
		for i := range x {
			out[i] = float32(float64(x[i]) * s * float64(w[i]))
		}
		return out
	}

	t.Run("rmsnorm and residual_norm", func(t *testing.T) {
		const n, C = 5, 72
		h0, o := randF32(rng, n*C, 2), randF32(rng, n*C, 2)
		wPost, wMid, wNext, gw := randF32(rng, C, 1), randF32(rng, C, 1), randF32(rng, C, 1), randF32(rng, C, 0.1)
		x := upload(t, g, make([]float32, n*C))
		l, err := k.RMSNorm(x, upload(t, g, h0), upload(t, g, wNext), n, C, eps)
		run(t, g, k, l, err)
		got := download[float32](t, g, x, n*C)
		for r := range n {
			near(t, "rmsnorm", got[r*C:(r+1)*C], rmsRef(h0[r*C:(r+1)*C], wNext), 1e-5)
		}
		h := upload(t, g, h0)
		gate := upload(t, g, make([]float32, n))
		l, err = k.ResidualNorm(ResidualNorm{H: h, O: upload(t, g, o), WPost: upload(t, g, wPost), WMid: upload(t, g, wMid),
			WNext: upload(t, g, wNext), XOut: x, GateW: upload(t, g, gw), GateOut: gate, GateB: 0.25}, n, C, eps)
		run(t, g, k, l, err)
		gotH, gotX, gotG := download[float32](t, g, h, n*C), download[float32](t, g, x, n*C), download[float32](t, g, gate, n)
		for r := range n {
			hr := slices.Clone(h0[r*C : (r+1)*C])
			on := rmsRef(o[r*C:(r+1)*C], wPost)
			for c := range hr {
				hr[c] += on[c]
			}
			hr = rmsRef(hr, wMid)
			near(t, "residual_norm h", gotH[r*C:(r+1)*C], hr, 1e-5)
			near(t, "residual_norm x", gotX[r*C:(r+1)*C], rmsRef(hr, wNext), 1e-5)
			var gl float64 = 0.25
			for c := range hr {
				gl += float64(hr[c]) * float64(gw[c])
			}
			near(t, "gate", gotG[r:r+1], []float32{float32(gl)}, 1e-5)
		}
	})

	t.Run("matmul_rows is batch-invariant", func(t *testing.T) {
		const n, N, K = 13, 24, 64
		w := toBF16(randF32(rng, N*K, 1))
		x := randF32(rng, n*K, 1)
		out := upload(t, g, make([]float32, n*N))
		wp := upload(t, g, w)
		l, err := k.MatmulRows(out, N, upload(t, g, x), K, wp, n, N, K)
		run(t, g, k, l, err)
		got := download[float32](t, g, out, n*N)
		for r := range n {
			for j := range N {
				var s float64
				for c := range K {
					s += float64(x[r*K+c]) * float64(model.BF16ToF32(w[j*K+c]))
				}
				near(t, "matmul_rows", got[r*N+j:r*N+j+1], []float32{float32(s)}, 1e-5)
			}
		}
		one := upload(t, g, make([]float32, N))
		l, err = k.MatmulRows(one, N, upload(t, g, x[5*K:6*K]), K, wp, 1, N, K)
		run(t, g, k, l, err)
		if alone := download[float32](t, g, one, N); !slices.Equal(alone, got[5*N:6*N]) {
			t.Errorf("row 5 alone %v\nrow 5 of 13 %v", alone, got[5*N:6*N])
		}
	})

	t.Run("swiglu", func(t *testing.T) {
		const n, C = 3, 300
		gu := randF32(rng, n*2*C, 4)
		out := upload(t, g, make([]float32, n*C))
		p := upload(t, g, gu)
		l, err := k.SwiGLU(out, p, 2*C, p.Add(4*C), 2*C, n, C)
		run(t, g, k, l, err)
		got := download[float32](t, g, out, n*C)
		for r := range n {
			for c := range C {
				x, u := float64(gu[r*2*C+c]), float64(gu[r*2*C+C+c])
				near(t, "swiglu", got[r*C+c:r*C+c+1], []float32{float32(x / (1 + math.Exp(-x)) * u)}, 1e-5)
			}
		}
	})

	t.Run("attention", func(t *testing.T) { deviceAttention(t, g, k, rng) })

	t.Run("exit_decide", func(t *testing.T) {
		const R = 4
		states := []ExitState{NewExitState(0.5, 4, false), NewExitState(0.9, 2, false), NewExitState(0.5, 3, true), NewExitState(1, 4, false)}
		ref := slices.Clone(states)
		st := upload(t, g, states)
		for step := range R {
			logits := randF32(rng, len(states), 3)
			steps := slices.Repeat([]int32{int32(step)}, len(states))
			cum, chosen := upload(t, g, make([]float32, len(states))), upload(t, g, make([]int32, len(states)))
			l, err := k.ExitDecide(st, 0, upload(t, g, steps), upload(t, g, logits), cum, chosen, len(states), R)
			run(t, g, k, l, err)
			gotCum, gotChosen := download[float32](t, g, cum, len(states)), download[int32](t, g, chosen, len(states))
			for i := range ref {
				engineGate(&ref[i], step, R, logits[i])
				if gotCum[i] != ref[i].Cum || gotChosen[i] != ref[i].Chosen {
					t.Fatalf("step %d row %d: cum %v chosen %d, want %v %d", step, i, gotCum[i], gotChosen[i], ref[i].Cum, ref[i].Chosen)
				}
			}
		}
	})

	t.Run("topk", func(t *testing.T) {
		const n, V, K = 3, 1000, 5
		logits := randF32(rng, n*V, 5)
		logits[7], logits[9], logits[11] = 9, 9, float32(math.NaN()) // a tie (smaller id first) and a NaN
		logits[V+3] = float32(math.Inf(-1))
		ids, vals, lse := upload(t, g, make([]int32, n*K)), upload(t, g, make([]float32, n*K)), upload(t, g, make([]float32, n))
		scoreIDs := []int32{7, 3, V}
		score := upload(t, g, make([]float32, n))
		l, err := k.TopK(ids, vals, lse, upload(t, g, scoreIDs), score, upload(t, g, logits), V, n, V, K)
		run(t, g, k, l, err)
		gotIDs, gotVals, gotLSE := download[int32](t, g, ids, n*K), download[float32](t, g, vals, n*K), download[float32](t, g, lse, n)
		gotScore := download[float32](t, g, score, n)
		if !math.IsNaN(float64(gotScore[2])) {
			t.Errorf("score of an id past the vocabulary: %v, want NaN", gotScore[2])
		}
		for r := range n {
			row := logits[r*V : (r+1)*V]
			order := make([]int, 0, V)
			var m float64 = math.Inf(-1)
			for c, v := range row {
				if !math.IsNaN(float64(v)) {
					order = append(order, c)
					m = math.Max(m, float64(v))
				}
			}
			sort.SliceStable(order, func(a, b int) bool { return row[order[a]] > row[order[b]] })
			var s float64
			for _, c := range order {
				s += math.Exp(float64(row[c]) - m)
			}
			for j := range K {
				if int(gotIDs[r*K+j]) != order[j] || gotVals[r*K+j] != row[order[j]] {
					t.Fatalf("row %d rank %d: id %d (%v), want %d (%v)", r, j, gotIDs[r*K+j], gotVals[r*K+j], order[j], row[order[j]])
				}
			}
			near(t, "lse", gotLSE[r:r+1], []float32{float32(m + math.Log(s))}, 1e-5)
			if r < 2 {
				near(t, "score", gotScore[r:r+1], []float32{float32(float64(row[scoreIDs[r]]) - m - math.Log(s))}, 1e-5)
			}
		}
	})

	t.Run("gather and scatter", func(t *testing.T) {
		const C = 300
		src := randF32(rng, 6*C, 1)
		idx := []int32{4, 0, 5}
		dst := upload(t, g, make([]float32, 3*C))
		sp := upload(t, g, src)
		l, err := k.GatherRows(dst, sp, upload(t, g, idx), 3, C)
		run(t, g, k, l, err)
		got := download[float32](t, g, dst, 3*C)
		for i, r := range idx {
			if !slices.Equal(got[i*C:(i+1)*C], src[int(r)*C:(int(r)+1)*C]) {
				t.Fatalf("gathered row %d is not source row %d", i, r)
			}
		}
		back := upload(t, g, make([]float32, 6*C))
		l, err = k.ScatterRows(back, dst, upload(t, g, idx), 3, C)
		run(t, g, k, l, err)
		gotBack := download[float32](t, g, back, 6*C)
		for i, r := range idx {
			if !slices.Equal(gotBack[int(r)*C:(int(r)+1)*C], got[i*C:(i+1)*C]) {
				t.Fatalf("scattered row %d is not at %d", i, r)
			}
		}
	})

	t.Run("graph replay", func(t *testing.T) {
		const n, N, K = 2, 16, 32
		w := upload(t, g, toBF16(randF32(rng, N*K, 1)))
		xs := randF32(rng, n*K, 1)
		x := upload(t, g, xs)
		out := upload(t, g, make([]float32, n*N))
		l, err := k.MatmulRows(out, N, x, K, w, n, N, K)
		if err != nil {
			t.Fatal(err)
		}
		direct := func() []float32 {
			run(t, g, k, l, nil)
			return download[float32](t, g, out, n*N)
		}
		want1 := direct()
		if err := g.s.BeginCapture(CaptureThreadLocal); err != nil {
			t.Fatal(err)
		}
		if err := k.Run(g.s, l); err != nil {
			t.Fatal(err)
		}
		graph, err := g.s.EndCapture()
		if err != nil {
			t.Fatal(err)
		}
		exec, err := graph.Instantiate()
		if err != nil {
			t.Fatal(err)
		}
		defer exec.Destroy()
		_ = graph.Destroy()
		if err := g.d.CopyToDevice(out, AsBytes(make([]float32, n*N))); err != nil {
			t.Fatal(err)
		}
		if err := exec.Launch(g.s); err != nil {
			t.Fatal(err)
		}
		if got := download[float32](t, g, out, n*N); !slices.Equal(got, want1) {
			t.Fatal("graph replay differs from the direct launch")
		}
		for i := range xs { // the graph reads its buffers when it runs
			xs[i] = -xs[i]
		}
		if err := g.d.CopyToDevice(x, AsBytes(xs)); err != nil {
			t.Fatal(err)
		}
		if err := exec.Launch(g.s); err != nil {
			t.Fatal(err)
		}
		got := download[float32](t, g, out, n*N)
		for i := range got {
			if got[i] != -want1[i] {
				t.Fatalf("replay on new input: out[%d] = %v, want %v", i, got[i], -want1[i])
			}
		}
	})
}

// engineGate is the engine's exit rule (runtime/engine batcher.gate) on an ExitState, in the
// same float32 operations: what exit_decide must reproduce bit for bit.
func engineGate(s *ExitState, t, R int, gate float32) {
	var p float32
	if t == R-1 {
		p = s.Rest
	} else {
		lam := float32(1 / (1 + math.Exp(-float64(gate))))
		p = lam * s.Rest
		s.Rest *= 1 - lam
	}
	s.Cum += p
	if s.Chosen < 0 && (t+1 >= int(s.MaxDepth) || t == R-1 || (s.Forced == 0 && s.Cum >= s.Tau)) {
		s.Chosen = int32(t)
	}
}

// deviceAttention writes two sequences' keys and values through rope_kv into a paged cache
// (pages in shuffled order, positions past the rotation table rotated on the device), runs
// prefill attention over both, then a decode row each with split-K attention, and compares
// with plain causal grouped-query attention in Go; then kv_copy between cache slots.
func deviceAttention(t *testing.T, g *gpu, k *Kernels, rng *rand.Rand) {
	const (
		nh, nkv, hd = 4, 2, 16
		qd, kvd     = nh * hd, nkv * hd
		ld          = qd + 2*kvd // fused q|k|v rows
		ropeLen     = 10
	)
	lay := CacheLayout{Seqs: 2, Slots: 2, Layers: 1, MaxPages: 100}
	pool := lay.Seqs * lay.Slots * lay.MaxPages // pages of 4 positions
	tab := make([]int32, lay.TableLen())
	for i, p := range rng.Perm(pool) {
		tab[i] = int32(p)
	}
	kPool, vPool := upload(t, g, make([]float32, pool*4*kvd)), upload(t, g, make([]float32, pool*4*kvd))
	cache := KVCache{KPool: kPool, VPool: vPool, PageTab: upload(t, g, tab)}
	inv := make([]float32, hd/2)
	for i := range inv {
		inv[i] = float32(1 / math.Pow(10000, float64(2*i)/hd))
	}
	cs, invP := upload(t, g, RoPETable(inv, ropeLen)), upload(t, g, inv)
	rotate := func(x []float32, pos int) {
		for h := 0; h < len(x)/hd; h++ {
			v := x[h*hd : (h+1)*hd]
			for i := range hd / 2 {
				s, c := math.Sincos(float64(float32(pos) * inv[i]))
				a, b := float64(v[i]), float64(v[i+hd/2])
				v[i], v[i+hd/2] = float32(a*c-b*s), float32(b*c+a*s)
			}
		}
	}
	type row struct{ seq, pos int }
	var keys, vals [2][][]float32 // per sequence, per position: rotated k, v
	scale := float32(1 / math.Sqrt(hd))
	refAttn := func(q []float32, r row) []float32 {
		out := make([]float32, qd)
		for h := range nh {
			kh := h / (nh / nkv)
			sc := make([]float64, r.pos+1)
			m := math.Inf(-1)
			for p := 0; p <= r.pos; p++ {
				for d := range hd {
					sc[p] += float64(q[h*hd+d]) * float64(scale) * float64(keys[r.seq][p][kh*hd+d])
				}
				m = math.Max(m, sc[p])
			}
			var l float64
			for p := range sc {
				sc[p] = math.Exp(sc[p] - m)
				l += sc[p]
			}
			for d := range hd {
				var a float64
				for p := range sc {
					a += sc[p] * float64(vals[r.seq][p][kh*hd+d])
				}
				out[h*hd+d] = float32(a / l)
			}
		}
		return out
	}
	step := func(rows []row, decode bool) {
		n := len(rows)
		qkv := randF32(rng, n*ld, 1)
		pos, off := make([]int32, n), make([]int32, n)
		qs := make([][]float32, n)
		for i, r := range rows {
			pos[i], off[i] = int32(r.pos), lay.TabOff(r.seq, 0)
			q := slices.Clone(qkv[i*ld : i*ld+qd])
			kk := slices.Clone(qkv[i*ld+qd : i*ld+qd+kvd])
			rotate(q, r.pos)
			rotate(kk, r.pos)
			qs[i] = q
			keys[r.seq] = append(keys[r.seq], kk)
			vals[r.seq] = append(vals[r.seq], slices.Clone(qkv[i*ld+qd+kvd:(i+1)*ld]))
		}
		buf := upload(t, g, qkv)
		c := cache
		c.TabOff = upload(t, g, off)
		posP := upload(t, g, pos)
		l, err := k.RoPEKV(RoPEKV{Q: buf, K: buf.Add(4 * qd), V: buf.Add(4 * (qd + kvd)), LdQ: ld, LdK: ld, LdV: ld,
			Pos: posP, Cache: c, RopeCS: cs, RopeLen: ropeLen, InvFreq: invP}, n, nh, nkv)
		run(t, g, k, l, err)
		gotQ := download[float32](t, g, buf, n*ld)
		for i := range rows {
			near(t, "rotated q", gotQ[i*ld:i*ld+qd], qs[i], 1e-5)
		}
		out := upload(t, g, make([]float32, n*qd))
		a := Attn{Q: buf, LdQ: ld, Cache: c, Pos: posP}
		if decode {
			maxPos := 0
			for _, r := range rows {
				maxPos = max(maxPos, r.pos)
			}
			splits := DecodeSplits(maxPos)
			po, pm := k.DecodeScratch(n, nh, splits)
			partO, partML := upload(t, g, make([]byte, po)), upload(t, g, make([]byte, pm))
			l, err = k.AttnDecode(a, partO, partML, 0, n, nh, nkv, splits, scale)
			run(t, g, k, l, err)
			l, err = k.AttnCombine(out, qd, partO, partML, 0, n, nh, splits)
			run(t, g, k, l, err)
		} else {
			tiles, single := PlanTiles(off)
			if len(single) != 0 {
				t.Fatalf("prefill rows planned as decode: %v", single)
			}
			l, err = k.AttnPrefill(a, out, qd, upload(t, g, tiles), len(tiles)/2, nh, nkv, scale)
			run(t, g, k, l, err)
		}
		got := download[float32](t, g, out, n*qd)
		for i, r := range rows {
			near(t, "attention", got[i*qd:(i+1)*qd], refAttn(qs[i], r), 1e-4)
		}
	}
	var prefill []row
	for p := range 21 {
		prefill = append(prefill, row{0, p})
	}
	for p := range 6 {
		prefill = append(prefill, row{1, p})
	}
	step(prefill, false)
	step([]row{{0, 21}, {1, 6}}, true)
	// A longer sequence: prefill tiles over many KV tiles, then a decode row over three splits.
	prefill = prefill[:0]
	for p := 7; p <= 300; p++ {
		prefill = append(prefill, row{1, p})
	}
	step(prefill, false)
	step([]row{{1, 301}, {0, 22}}, true)

	// kv_copy: positions 3..5 of sequence 0, slot 0, to positions 9..11 of sequence 1, slot 1,
	// checked in the pools.
	var j KVCopies
	lay.AppendCopies(&j, 0, 0, 3, 1, 1, 9, 3)
	l, err := k.KVCopy(kPool, vPool, cache.PageTab, upload(t, g, j.SrcOff), upload(t, g, j.SrcPos),
		upload(t, g, j.DstOff), upload(t, g, j.DstPos), j.Len(), kvd)
	run(t, g, k, l, err)
	kp, vp := download[float32](t, g, kPool, pool*4*kvd), download[float32](t, g, vPool, pool*4*kvd)
	for i := range 3 {
		p := 9 + i
		slot := int(tab[int(lay.TabOff(1, 1))+p/4])*4 + p%4
		near(t, "copied key", kp[slot*kvd:(slot+1)*kvd], keys[0][3+i], 1e-6)
		near(t, "copied value", vp[slot*kvd:(slot+1)*kvd], vals[0][3+i], 1e-6)
	}
}

// TestDeviceBF16Rounding: the bf16 mode's rmsnorm output is the f32 mode's output rounded by
// the host's model.F32ToBF16, bit for bit (the device's f32_to_bf16 is the host's).
func TestDeviceBF16Rounding(t *testing.T) {
	g := testGPU(t)
	f32 := g.kernels(t, Spec{HeadDim: 16, KVPage: 4})
	bf := g.kernels(t, Spec{HeadDim: 16, KVPage: 4, ActBF16: true, KVBF16: true})
	rng := rand.New(rand.NewPCG(9, 10))
	const n, C = 4, 1000
	x, w := upload(t, g, randF32(rng, n*C, 3)), upload(t, g, randF32(rng, C, 2))
	o32, o16 := upload(t, g, make([]float32, n*C)), upload(t, g, make([]uint16, n*C))
	l, err := f32.RMSNorm(o32, x, w, n, C, 1e-6)
	run(t, g, f32, l, err)
	l, err = bf.RMSNorm(o16, x, w, n, C, 1e-6)
	run(t, g, bf, l, err)
	want, got := download[float32](t, g, o32, n*C), download[uint16](t, g, o16, n*C)
	for i := range got {
		if got[i] != model.F32ToBF16(want[i]) {
			t.Fatalf("element %d: bf16 %#04x, host rounding of %v is %#04x", i, got[i], want[i], model.F32ToBF16(want[i]))
		}
	}
}

// TestDeviceGemm: cuBLASLt's bf16 product with f32 accumulation against Go.
func TestDeviceGemm(t *testing.T) {
	g := testGPU(t)
	blt, err := LoadBLASLt()
	if err != nil {
		t.Skipf("a GPU but no cuBLASLt: %v", err)
	}
	h, err := blt.NewHandle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Destroy()
	rng := rand.New(rand.NewPCG(11, 12))
	const n, N, K, ws = 33, 64, 128, 4 << 20
	w, x := toBF16(randF32(rng, N*K, 1)), toBF16(randF32(rng, n*K, 1))
	gm, err := h.NewGemm(n, N, K, K, N, false, ws)
	if err != nil {
		t.Fatal(err)
	}
	defer gm.Destroy()
	out, work := upload(t, g, make([]float32, n*N)), upload(t, g, make([]byte, ws))
	if err := gm.Run(g.s, out, upload(t, g, x), upload(t, g, w), work); err != nil {
		t.Fatal(err)
	}
	got := download[float32](t, g, out, n*N)
	for r := range n {
		for j := range N {
			var s float64
			for c := range K {
				s += float64(model.BF16ToF32(x[r*K+c])) * float64(model.BF16ToF32(w[j*K+c]))
			}
			near(t, "gemm", got[r*N+j:r*N+j+1], []float32{float32(s)}, 1e-4)
		}
	}
}
