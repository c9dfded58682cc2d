package cuda

import (
	"fmt"
	"math"
	"sort"
	"unsafe"

	"github.com/loopserve/loopserve/cudakern"
	"github.com/loopserve/loopserve/runtime/model"
)

// interp is a test double of the device: memory is host memory at made-up device addresses,
// and Launch executes the planned launch with a plain Go rendering of the named kernel (the
// semantics written in cudakern/kernels/*.cu, f32 arithmetic, one row at a time). It checks
// every launch against the kernel's recorded signature and every address against the
// allocations, so a wrong plan fails here as it would on a device, or worse.
type interp struct {
	spec   cudakern.Spec
	allocs []alloc // by base
	next   cudakern.DevicePtr
	free   uint64
	// counts
	launches map[string]int
	rows     int // rows of every exit_decide launch: loop steps run on the device
}

type alloc struct {
	base cudakern.DevicePtr
	mem  []byte
}

func newInterp(spec cudakern.Spec) *interp {
	return &interp{spec: spec, next: 0x7f0000000000, free: 1 << 30, launches: map[string]int{}}
}

func (d *interp) Alloc(bytes int) (cudakern.DevicePtr, error) {
	if bytes <= 0 {
		return 0, fmt.Errorf("interp: alloc %d bytes", bytes)
	}
	words := make([]uint64, (bytes+7)/8)
	mem := unsafe.Slice((*byte)(unsafe.Pointer(&words[0])), bytes)
	p := d.next
	d.next += cudakern.DevicePtr((bytes+4095)&^4095 + 4096) // a gap: overruns fault
	d.allocs = append(d.allocs, alloc{p, mem})
	return p, nil
}

func (d *interp) find(p cudakern.DevicePtr, bytes int) []byte {
	i := sort.Search(len(d.allocs), func(i int) bool { return d.allocs[i].base > p }) - 1
	if i < 0 || p == 0 {
		panic(fmt.Sprintf("interp: address %#x is not allocated", uint64(p)))
	}
	a := d.allocs[i]
	off := int(p - a.base)
	if off+bytes > len(a.mem) {
		panic(fmt.Sprintf("interp: %d bytes at %#x overrun an allocation of %d at %#x", bytes, uint64(p), len(a.mem), uint64(a.base)))
	}
	return a.mem[off : off+bytes]
}

func (d *interp) Free(p cudakern.DevicePtr) {
	for i, a := range d.allocs {
		if a.base == p {
			d.allocs = append(d.allocs[:i], d.allocs[i+1:]...)
			return
		}
	}
	panic(fmt.Sprintf("interp: free of %#x, not allocated", uint64(p)))
}

func (d *interp) Write(dst cudakern.DevicePtr, src []byte) error {
	copy(d.find(dst, len(src)), src)
	return nil
}

func (d *interp) MemInfo() (uint64, uint64, error) { return d.free, 2 * d.free, nil }

func (d *interp) Planner() cudakern.Planner {
	return cudakern.Planner{Spec: d.spec, MaxShared: 227 << 10}
}

func (d *interp) NewQueue() (queue, error) { return d, nil }

func (d *interp) Close() error { return nil }

// queue: every call runs at once, so order is trivially kept.

func (d *interp) Upload(dst cudakern.DevicePtr, src []byte) error { return d.Write(dst, src) }

func (d *interp) Copy(dst, src cudakern.DevicePtr, bytes int) error {
	copy(d.find(dst, bytes), d.find(src, bytes))
	return nil
}

func (d *interp) Download(dst []byte, src cudakern.DevicePtr) error {
	copy(dst, d.find(src, len(dst)))
	return nil
}

func (d *interp) Sync() error { return nil }

// views

func (d *interp) f32(p cudakern.DevicePtr, n int) []float32 {
	if n == 0 {
		return nil
	}
	b := d.find(p, 4*n)
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), n)
}

func (d *interp) i32(p cudakern.DevicePtr, n int) []int32 {
	if n == 0 {
		return nil
	}
	b := d.find(p, 4*n)
	return unsafe.Slice((*int32)(unsafe.Pointer(&b[0])), n)
}

func (d *interp) u16(p cudakern.DevicePtr, n int) []uint16 {
	if n == 0 {
		return nil
	}
	b := d.find(p, 2*n)
	return unsafe.Slice((*uint16)(unsafe.Pointer(&b[0])), n)
}

// vec is a typed view: act_t or kv_t buffers are bf16 or f32 by the spec.
type vec struct {
	f []float32
	h []uint16
}

func (v vec) get(i int) float32 {
	if v.h != nil {
		return model.BF16ToF32(v.h[i])
	}
	return v.f[i]
}

func (v vec) set(i int, x float32) {
	if v.h != nil {
		v.h[i] = model.F32ToBF16(x)
		return
	}
	v.f[i] = x
}

func (d *interp) typed(p cudakern.DevicePtr, n int, bf16 bool) vec {
	if bf16 {
		return vec{h: d.u16(p, n)}
	}
	return vec{f: d.f32(p, n)}
}

// args decodes a launch's arguments.
type args struct {
	vals []uint64
	i    int
}

func (a *args) ptr() cudakern.DevicePtr { a.i++; return cudakern.DevicePtr(a.vals[a.i-1]) }
func (a *args) int() int                { a.i++; return int(int32(uint32(a.vals[a.i-1]))) }
func (a *args) float() float32          { a.i++; return math.Float32frombits(uint32(a.vals[a.i-1])) }

func rmsScale(x []float32, eps float32) float32 {
	var ss float32
	for _, v := range x {
		ss += v * v
	}
	return 1 / float32(math.Sqrt(float64(ss/float32(len(x))+eps)))
}

func (d *interp) Launch(l cudakern.Launch) error {
	if err := l.Args.Err(); err != nil {
		return err
	}
	var sig cudakern.Kernel
	for _, u := range cudakern.Units() {
		for _, k := range u.Kernels {
			if k.Name == l.Kernel {
				sig = k
			}
		}
	}
	if sig.Name == "" {
		return fmt.Errorf("interp: no kernel %q", l.Kernel)
	}
	kinds := l.Args.Kinds()
	if len(kinds) != len(sig.Params) {
		return fmt.Errorf("interp: %s: %d arguments for %v", l.Kernel, len(kinds), sig)
	}
	for i, p := range sig.Params {
		if kinds[i] != p.Kind {
			return fmt.Errorf("interp: %s: argument %d is %v, want %v", l.Kernel, i, kinds[i], sig)
		}
	}
	d.launches[l.Kernel]++
	a := &args{vals: l.Args.Values()}
	act, kvb := d.spec.ActBF16, d.spec.KVBF16
	HD := d.spec.HeadDim
	switch l.Kernel {
	case "embed":
		h, table, ids, n, cols, vocab := a.ptr(), a.ptr(), a.ptr(), a.int(), a.int(), a.int()
		idv := d.i32(ids, n)
		for r := range n {
			dst := d.f32(h.Add(4*r*cols), cols)
			id := int(idv[r])
			if id < 0 || id >= vocab {
				clear(dst)
				continue
			}
			for c, b := range d.u16(table.Add(2*id*cols), cols) {
				dst[c] = model.BF16ToF32(b)
			}
		}
	case "rmsnorm":
		out, x, w, n, cols, eps := a.ptr(), a.ptr(), a.ptr(), a.int(), a.int(), a.float()
		wv := d.f32(w, cols)
		o := d.typed(out, n*cols, act)
		for r := range n {
			xr := d.f32(x.Add(4*r*cols), cols)
			s := rmsScale(xr, eps)
			for c := range cols {
				o.set(r*cols+c, xr[c]*s*wv[c])
			}
		}
	case "cast_rows":
		out, x, n, cols := a.ptr(), a.ptr(), a.int(), a.int()
		o, xv := d.typed(out, n*cols, act), d.f32(x, n*cols)
		for i, v := range xv {
			o.set(i, v)
		}
	case "residual_norm":
		h, o, wPost, wMid, wNext, xOut, gateW, gateB, gateOut, n, cols, eps :=
			a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.float(), a.ptr(), a.int(), a.int(), a.float()
		for r := range n {
			hr, or := d.f32(h.Add(4*r*cols), cols), d.f32(o.Add(4*r*cols), cols)
			s, wp := rmsScale(or, eps), d.f32(wPost, cols)
			for c := range cols {
				hr[c] += or[c] * s * wp[c]
			}
			if wMid != 0 {
				s2, wm := rmsScale(hr, eps), d.f32(wMid, cols)
				for c := range cols {
					hr[c] = hr[c] * s2 * wm[c]
				}
			}
			if wNext != 0 {
				s3, wn, xo := rmsScale(hr, eps), d.f32(wNext, cols), d.typed(xOut.Add(r*cols*elem(act)), cols, act)
				for c := range cols {
					xo.set(c, hr[c]*s3*wn[c])
				}
			}
			if gateW != 0 {
				var g float32
				for c, w := range d.f32(gateW, cols) {
					g += hr[c] * w
				}
				d.f32(gateOut, n)[r] = g + gateB
			}
		}
	case "rope_kv":
		q, ldq, k, ldk, v, ldv, pos, tabOff, pageTab, layerOff, kPool, vPool, ropeCS, ropeLen, invFreq, n, nh, nkv :=
			a.ptr(), a.int(), a.ptr(), a.int(), a.ptr(), a.int(), a.ptr(), a.ptr(), a.ptr(), a.int(), a.ptr(), a.ptr(), a.ptr(), a.int(), a.ptr(), a.int(), a.int(), a.int()
		half, kvDim := HD/2, nkv*HD
		inv := d.f32(invFreq, half)
		for r := range n {
			p := int(d.i32(pos, n)[r])
			slot := d.kvSlot(pageTab, int(d.i32(tabOff, n)[r])+layerOff, p)
			kd, vd := d.typed(kPool.Add(slot*kvDim*elem(kvb)), kvDim, kvb), d.typed(vPool.Add(slot*kvDim*elem(kvb)), kvDim, kvb)
			angle := func(i int) (float32, float32) {
				if p < ropeLen {
					e := d.f32(ropeCS.Add(4*(p*half+i)*2), 2)
					return e[0], e[1]
				}
				s, c := math.Sincos(float64(float32(p) * inv[i]))
				return float32(c), float32(s)
			}
			for head := range nh + nkv {
				var x []float32
				if head < nh {
					x = d.f32(q.Add(4*(r*ldq+head*HD)), HD)
				} else {
					x = d.f32(k.Add(4*(r*ldk+(head-nh)*HD)), HD)
				}
				for i := range half {
					c, s := angle(i)
					if head < nh {
						x0, x1 := x[i], x[i+half]
						x[i], x[i+half] = x0*c-x1*s, x1*c+x0*s
					} else {
						kh := head - nh
						kd.set(kh*HD+i, x[i]*c-x[i+half]*s)
						kd.set(kh*HD+i+half, x[i+half]*c+x[i]*s)
					}
				}
			}
			for e, x := range d.f32(v.Add(4*r*ldv), kvDim) {
				vd.set(e, x)
			}
		}
	case "kv_copy":
		kPool, vPool, pageTab, srcOff, srcPos, dstOff, dstPos, m, kvDim := a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.int(), a.int()
		so, sp, do, dp := d.i32(srcOff, m), d.i32(srcPos, m), d.i32(dstOff, m), d.i32(dstPos, m)
		type job struct{ src, dst int }
		var jobs []job
		for j := range m {
			jobs = append(jobs, job{d.kvSlot(pageTab, int(so[j]), int(sp[j])), d.kvSlot(pageTab, int(do[j]), int(dp[j]))})
		}
		// A launch's jobs run in parallel: read every source before writing, so a plan that
		// relies on an order inside one launch reads stale values here as on a device.
		e := elem(kvb)
		var buf [][2][]byte
		for _, j := range jobs {
			buf = append(buf, [2][]byte{append([]byte(nil), d.find(kPool.Add(j.src*kvDim*e), kvDim*e)...), append([]byte(nil), d.find(vPool.Add(j.src*kvDim*e), kvDim*e)...)})
		}
		for i, j := range jobs {
			copy(d.find(kPool.Add(j.dst*kvDim*e), kvDim*e), buf[i][0])
			copy(d.find(vPool.Add(j.dst*kvDim*e), kvDim*e), buf[i][1])
		}
	case "attn_decode":
		partO, partML, q, ldq, kPool, vPool, pageTab, tabOff, layerOff, pos, rowIdx, n, nh, nkv, chunk, scale :=
			a.ptr(), a.ptr(), a.ptr(), a.int(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.int(), a.ptr(), a.ptr(), a.int(), a.int(), a.int(), a.int(), a.float()
		splits := int(l.Grid.Z)
		G, kvDim := nh/nkv, nkv*HD
		po, pm := d.f32(partO, n*nh*splits*HD), d.f32(partML, n*nh*splits*2)
		for i := range n {
			r := i
			if rowIdx != 0 {
				r = int(d.i32(rowIdx, n)[i])
			}
			p := int(d.i32(pos, r+1)[r])
			off := int(d.i32(tabOff, r+1)[r]) + layerOff
			for head := range nh {
				kvh := head / G
				qv := d.f32(q.Add(4*(r*ldq+head*HD)), HD)
				for sp := range splits {
					at := (i*nh+head)*splits + sp
					c0, c1 := sp*chunk, min(sp*chunk+chunk, p+1)
					if c1 <= c0 {
						pm[2*at], pm[2*at+1] = float32(math.Inf(-1)), 0
						continue
					}
					sc := make([]float32, c1-c0)
					vrows := make([]vec, len(sc))
					mx := float32(math.Inf(-1))
					for j := range sc {
						at := d.kvSlot(pageTab, off, c0+j)*kvDim*elem(kvb) + kvh*HD*elem(kvb)
						kr := d.typed(kPool.Add(at), HD, kvb)
						vrows[j] = d.typed(vPool.Add(at), HD, kvb)
						var s float32
						for e := range HD {
							s += qv[e] * scale * kr.get(e)
						}
						sc[j] = s
						mx = max(mx, s)
					}
					var sum float32
					for j := range sc {
						sc[j] = float32(math.Exp(float64(sc[j] - mx)))
						sum += sc[j]
					}
					for e := range HD {
						var acc float32
						for j := range sc {
							acc += sc[j] * vrows[j].get(e)
						}
						po[at*HD+e] = acc
					}
					pm[2*at], pm[2*at+1] = mx, sum
				}
			}
		}
	case "attn_combine":
		out, ldo, partO, partML, rowIdx, n, nh, splits := a.ptr(), a.int(), a.ptr(), a.ptr(), a.ptr(), a.int(), a.int(), a.int()
		po, pm := d.f32(partO, n*nh*splits*HD), d.f32(partML, n*nh*splits*2)
		for i := range n {
			r := i
			if rowIdx != 0 {
				r = int(d.i32(rowIdx, n)[i])
			}
			o := d.typed(out.Add(r*ldo*elem(act)), nh*HD, act)
			for head := range nh {
				base := (i*nh + head) * splits
				M := float32(math.Inf(-1))
				for s := range splits {
					if pm[2*(base+s)+1] > 0 {
						M = max(M, pm[2*(base+s)])
					}
				}
				var L float32
				for s := range splits {
					if pm[2*(base+s)+1] > 0 {
						L += pm[2*(base+s)+1] * float32(math.Exp(float64(pm[2*(base+s)]-M)))
					}
				}
				for e := range HD {
					var acc float32
					for s := range splits {
						if pm[2*(base+s)+1] > 0 {
							acc += float32(math.Exp(float64(pm[2*(base+s)]-M))) * po[(base+s)*HD+e]
						}
					}
					o.set(head*HD+e, acc/L)
				}
			}
		}
	case "attn_prefill":
		out, ldo, q, ldq, kPool, vPool, pageTab, tabOff, layerOff, pos, tiles, ntiles, nh, nkv, scale :=
			a.ptr(), a.int(), a.ptr(), a.int(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.int(), a.ptr(), a.ptr(), a.int(), a.int(), a.int(), a.float()
		G, kvDim := nh/nkv, nkv*HD
		tv := d.i32(tiles, 2*ntiles)
		for t := range ntiles {
			r0, nr := int(tv[2*t]), min(int(tv[2*t+1]), 16)
			off0 := int(d.i32(tabOff, r0+1)[r0])
			for i := range nr {
				r := r0 + i
				if int(d.i32(tabOff, r+1)[r]) != off0 {
					return fmt.Errorf("interp: attn_prefill tile %d mixes caches", t)
				}
				p := int(d.i32(pos, r+1)[r])
				o := d.typed(out.Add(r*ldo*elem(act)), nh*HD, act)
				for head := range nh {
					kvh := head / G
					qv := d.f32(q.Add(4*(r*ldq+head*HD)), HD)
					sc := make([]float32, p+1)
					vrows := make([]vec, len(sc))
					mx := float32(math.Inf(-1))
					for j := range sc {
						at := d.kvSlot(pageTab, off0+layerOff, j)*kvDim*elem(kvb) + kvh*HD*elem(kvb)
						kr := d.typed(kPool.Add(at), HD, kvb)
						vrows[j] = d.typed(vPool.Add(at), HD, kvb)
						var s float32
						for e := range HD {
							s += qv[e] * scale * kr.get(e)
						}
						sc[j], mx = s, max(mx, s)
					}
					var sum float32
					for j := range sc {
						sc[j] = float32(math.Exp(float64(sc[j] - mx)))
						sum += sc[j]
					}
					for e := range HD {
						var acc float32
						for j := range sc {
							acc += sc[j] * vrows[j].get(e)
						}
						o.set(head*HD+e, acc/sum)
					}
				}
			}
		}
	case "matmul_rows":
		out, ldo, x, ldx, w, n, N, K := a.ptr(), a.int(), a.ptr(), a.int(), a.ptr(), a.int(), a.int(), a.int()
		wv := d.u16(w, N*K)
		for r := range n {
			xr := d.typed(x.Add(r*ldx*elem(act)), K, act)
			or := d.f32(out.Add(4*r*ldo), N)
			for c := range N {
				var s float32
				for e := range K {
					s += xr.get(e) * model.BF16ToF32(wv[c*K+e])
				}
				or[c] = s
			}
		}
	case "swiglu":
		out, g, ldg, u, ldu, n, cols := a.ptr(), a.ptr(), a.int(), a.ptr(), a.int(), a.int(), a.int()
		for r := range n {
			o, gr, ur := d.typed(out.Add(r*cols*elem(act)), cols, act), d.f32(g.Add(4*r*ldg), cols), d.f32(u.Add(4*r*ldu), cols)
			for c := range cols {
				x := gr[c]
				o.set(c, x/(1+float32(math.Exp(float64(-x))))*ur[c])
			}
		}
	case "exit_decide":
		st, slot, step, gate, cumOut, chosenOut, n, R := a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.int(), a.int()
		d.rows += n
		for i := range n {
			si := i
			if slot != 0 {
				si = int(d.i32(slot, n)[i])
			}
			b := d.find(st.Add(24*si), 24)
			s := (*cudakern.ExitState)(unsafe.Pointer(&b[0]))
			t := int(d.i32(step, n)[i])
			var p float32
			if t == R-1 {
				p = s.Rest
			} else {
				lam := float32(1 / (1 + math.Exp(-float64(d.f32(gate, n)[i]))))
				p = lam * s.Rest
				s.Rest *= 1 - lam
			}
			s.Cum += p
			if s.Chosen < 0 && (t+1 >= int(s.MaxDepth) || t == R-1 || (s.Forced == 0 && s.Cum >= s.Tau)) {
				s.Chosen = int32(t)
			}
			d.f32(cumOut, n)[i] = s.Cum
			d.i32(chosenOut, n)[i] = s.Chosen
		}
	case "topk":
		ids, vals, lse, scoreID, scoreOut, logits, ld, n, vocab, k := a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.ptr(), a.int(), a.int(), a.int(), a.int()
		for r := range n {
			x := d.f32(logits.Add(4*r*ld), vocab)
			order := make([]int, 0, vocab)
			for c, v := range x {
				if v == v {
					order = append(order, c)
				}
			}
			sort.SliceStable(order, func(i, j int) bool { return x[order[i]] > x[order[j]] })
			for j := range k {
				if j < len(order) {
					d.i32(ids, n*k)[r*k+j], d.f32(vals, n*k)[r*k+j] = int32(order[j]), x[order[j]]
				} else {
					d.i32(ids, n*k)[r*k+j], d.f32(vals, n*k)[r*k+j] = -1, float32(math.Inf(-1))
				}
			}
			if lse != 0 {
				m := float32(math.Inf(-1))
				for _, v := range x {
					if v == v {
						m = max(m, v)
					}
				}
				var s float32
				for _, v := range x {
					if v == v {
						s += float32(math.Exp(float64(v - m)))
					}
				}
				z := m + float32(math.Log(float64(s)))
				d.f32(lse, n)[r] = z
				if scoreID != 0 {
					id := int(d.i32(scoreID, n)[r])
					if id >= 0 && id < vocab {
						d.f32(scoreOut, n)[r] = x[id] - z
					} else {
						d.f32(scoreOut, n)[r] = float32(math.NaN())
					}
				}
			}
		}
	case "gather_rows", "scatter_rows":
		dst, src, idx, m, cols := a.ptr(), a.ptr(), a.ptr(), a.int(), a.int()
		iv := d.i32(idx, m)
		seen := map[int32]bool{}
		for i := range m {
			if l.Kernel == "gather_rows" {
				copy(d.f32(dst.Add(4*i*cols), cols), d.f32(src.Add(4*int(iv[i])*cols), cols))
				continue
			}
			if seen[iv[i]] {
				return fmt.Errorf("interp: scatter_rows to row %d twice", iv[i])
			}
			seen[iv[i]] = true
			copy(d.f32(dst.Add(4*int(iv[i])*cols), cols), d.f32(src.Add(4*i*cols), cols))
		}
	default:
		return fmt.Errorf("interp: kernel %s has no interpretation", l.Kernel)
	}
	return nil
}

func elem(bf16 bool) int {
	if bf16 {
		return 2
	}
	return 4
}

// kvSlot is the pool row of position p of the page list at off (common.cuh's kv_slot).
func (d *interp) kvSlot(pageTab cudakern.DevicePtr, off, p int) int {
	page := d.i32(pageTab.Add(4*(off+p/kvPage)), 1)[0]
	return int(page)*kvPage + p%kvPage
}
