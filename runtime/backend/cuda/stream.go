package cuda

import (
	"fmt"
	"math"
	"unsafe"

	"github.com/loopserve/loopserve/cudakern"
	"github.com/loopserve/loopserve/runtime/engine"
)

// stream is a device queue with its hidden states, page table and scratch. Device buffers
// grow on demand; a grow waits for the queue (Sync) before freeing the old buffer.
type stream struct {
	x   *executor
	q   queue
	pl  cudakern.Planner
	tab *table

	states  devBuf // [slots, H] f32
	ptab    devBuf // the page table, int32
	scratch devBuf // per step: uploaded arguments, then activations

	// host memory reused across steps
	plan plan
	exit []cudakern.ExitState
	gate []float32
	ids  []int32
	vals []float32
	lse  []float32
	scr  []float32
	lgt  []float32
	top  []engine.Logprob
}

// devBuf is a growable device allocation.
type devBuf struct {
	p cudakern.DevicePtr
	n int
}

// ensure makes b at least n bytes; with keep, the old content is copied over.
func (s *stream) ensure(b *devBuf, n int, keep bool) error {
	if n <= b.n {
		return nil
	}
	n = max(n, 2*b.n, 4096)
	p, err := s.x.dev.Alloc(n)
	if err != nil {
		return fmt.Errorf("device memory for a stream (%d bytes): %w", n, err)
	}
	if b.n > 0 {
		if keep {
			if err := s.q.Copy(p, b.p, b.n); err != nil {
				s.x.dev.Free(p)
				return err
			}
		}
		if err := s.q.Sync(); err != nil {
			s.x.dev.Free(p)
			return err
		}
		s.x.dev.Free(b.p)
	}
	*b = devBuf{p, n}
	return nil
}

func (s *stream) NewKV(slots int) (engine.KV, error) { return s.tab.newKV(slots) }

func (s *stream) GrowKV(kv engine.KV, blocks int) error { return s.tab.grow(s.x.pages, kv, blocks) }

func (s *stream) FreeKV(kv engine.KV) {
	if err := s.tab.free(s.x.pages, kv); err != nil {
		panic(err) // the engine frees only what it made
	}
}

// syncTable uploads the page table's changed entries.
func (s *stream) syncTable() error {
	t := s.tab
	if t.dirtyLo < 0 {
		return nil
	}
	if 4*len(t.tab) > s.ptab.n {
		if err := s.ensure(&s.ptab, 4*len(t.tab), false); err != nil {
			return err
		}
		t.dirtyLo, t.dirtyHi = 0, len(t.tab)
	}
	if err := s.q.Upload(s.ptab.p.Add(4*t.dirtyLo), cudakern.AsBytes(t.tab[t.dirtyLo:t.dirtyHi])); err != nil {
		return err
	}
	t.dirtyLo = -1
	return nil
}

// CopyKV queues the copies as kv_copy waves. A copy naming a cache or position that does not
// exist is the engine's bug: it panics, as host.Caches does.
func (s *stream) CopyKV(cs []engine.KVCopy) {
	if err := s.copyKV(cs); err != nil {
		panic(fmt.Sprintf("CUDA backend: %v", err))
	}
}

func (s *stream) copyKV(cs []engine.KVCopy) error {
	j, err := s.tab.copies(cs)
	if err != nil || len(j.srcOff) == 0 {
		return err
	}
	if err := s.syncTable(); err != nil {
		return err
	}
	m := len(j.srcOff)
	if err := s.ensure(&s.scratch, 16*m, false); err != nil {
		return err
	}
	base := s.scratch.p
	for i, a := range [][]int32{j.srcOff, j.srcPos, j.dstOff, j.dstPos} {
		if err := s.q.Upload(base.Add(4*m*i), cudakern.AsBytes(a)); err != nil {
			return err
		}
	}
	at := func(i, k int) cudakern.DevicePtr { return base.Add(4 * (m*i + k)) }
	lo := 0
	for _, hi := range j.waves {
		l, err := s.pl.KVCopy(s.x.kPool, s.x.vPool, s.ptab.p, at(0, lo), at(1, lo), at(2, lo), at(3, lo), hi-lo, s.x.cfg.KVDim())
		if err != nil {
			return err
		}
		if err := s.q.Launch(l); err != nil {
			return err
		}
		lo = hi
	}
	return s.q.Sync() // the scratch is reused by the next call
}

// State copies slot i's state from the device.
func (s *stream) State(i int, dst []float32) {
	H := s.x.cfg.HiddenSize
	if i < 0 || (i+1)*H*4 > s.states.n {
		clear(dst[:H])
		return
	}
	if err := s.q.Download(cudakern.AsBytes(dst[:H]), s.states.p.Add(4*H*i)); err != nil {
		panic(fmt.Sprintf("CUDA backend: reading state %d: %v", i, err))
	}
}

func (s *stream) Close() error {
	err := s.q.Sync()
	for _, b := range []*devBuf{&s.states, &s.ptab, &s.scratch} {
		if b.n > 0 {
			s.x.dev.Free(b.p)
			*b = devBuf{}
		}
	}
	for kv, c := range s.tab.caches {
		if c != nil {
			_ = s.tab.free(s.x.pages, engine.KV(kv))
		}
	}
	if e := s.q.Close(); err == nil {
		err = e
	}
	return err
}

// carve lays out one step's scratch: each region 256-byte aligned.
type carve struct {
	base cudakern.DevicePtr
	off  int
}

func (c *carve) take(bytes int) cudakern.DevicePtr {
	p := c.base.Add(c.off)
	c.off += (bytes + 255) &^ 255
	return p
}

// Step implements engine.Stream.
func (s *stream) Step(b *engine.Batch) error {
	n := len(b.Rows)
	if n == 0 {
		return nil
	}
	x := s.x
	c := x.cfg
	if err := s.plan.build(b.Rows, s.tab, c); err != nil {
		return err
	}
	p := &s.plan
	if err := s.syncTable(); err != nil {
		return err
	}
	H, Q, KV, I, V := c.HiddenSize, c.QDim(), c.KVDim(), c.IntermediateSize, c.VocabSize
	if err := s.ensure(&s.states, 4*H*(p.maxState+1), true); err != nil {
		return err
	}
	act := 4
	if x.spec.ActBF16 {
		act = 2
	}
	mh, k := len(p.head), p.k
	splits := cudakern.DecodeSplits(p.maxDecodePos)
	partO, partML := s.pl.DecodeScratch(max(len(p.arrays[argSingle]), 1), c.NumAttentionHeads, splits)
	ints := p.ints()
	sizes := []int{
		4 * len(ints), 24 * n, // arguments, exit states
		4 * n * H, 4 * n * H, act * n * H, 4 * n * (Q + 2*KV), act * n * Q, 4 * n * H, 4 * n * 2 * I, act * n * I, 4 * n, 4 * n, 4 * n,
		partO, partML,
		4 * mh * H, act * mh * H, 4 * mh * V, 4 * mh * k, 4 * mh * k, 4 * mh, 4 * mh,
	}
	total := 0
	for _, z := range sizes {
		total += (z + 255) &^ 255
	}
	if err := s.ensure(&s.scratch, total, false); err != nil {
		return err
	}
	cv := carve{base: s.scratch.p}
	argP, stP := cv.take(sizes[0]), cv.take(sizes[1])
	hP, embP, xP, qkvP, attP, oP, guP, mmP := cv.take(sizes[2]), cv.take(sizes[3]), cv.take(sizes[4]), cv.take(sizes[5]), cv.take(sizes[6]), cv.take(sizes[7]), cv.take(sizes[8]), cv.take(sizes[9])
	gateP, cumP, chosenP := cv.take(sizes[10]), cv.take(sizes[11]), cv.take(sizes[12])
	partOP, partMLP := cv.take(sizes[13]), cv.take(sizes[14])
	hhP, hxP, logitsP, idsP, valsP, lseP, scoreP := cv.take(sizes[15]), cv.take(sizes[16]), cv.take(sizes[17]), cv.take(sizes[18]), cv.take(sizes[19]), cv.take(sizes[20]), cv.take(sizes[21])

	if err := s.q.Upload(argP, cudakern.AsBytes(ints)); err != nil {
		return err
	}
	s.exit = p.exitStates(s.exit[:0], b.Rows)
	if err := s.q.Upload(stP, exitBytes(s.exit)); err != nil {
		return err
	}
	arg := func(a intArg) cudakern.DevicePtr {
		if p.len[a] == 0 {
			return 0
		}
		return argP.Add(4 * p.at[a])
	}
	var ls []cudakern.Launch
	add := func(l cudakern.Launch, err error) error {
		if err != nil {
			return err
		}
		ls = append(ls, l)
		return nil
	}
	w := &x.w
	eps := float32(c.RMSNormEps)
	if err := add(s.pl.GatherRows(hP, s.states.p, arg(argState), n, H)); err != nil {
		return err
	}
	if m0 := p.len[argEmbedRow]; m0 > 0 {
		if err := add(s.pl.Embed(embP, w.embed, arg(argEmbedID), m0, H, V)); err != nil {
			return err
		}
		if err := add(s.pl.ScatterRows(hP, embP, arg(argEmbedRow), m0, H)); err != nil {
			return err
		}
	}
	if err := add(s.pl.RMSNorm(xP, hP, w.layers[0].in, n, H, eps)); err != nil {
		return err
	}
	ld := Q + 2*KV
	scale := float32(1 / math.Sqrt(float64(x.spec.HeadDim)))
	nh, nkv := c.NumAttentionHeads, c.NumKeyValueHeads
	for li := range w.layers {
		L := &w.layers[li]
		cache := cudakern.KVCache{KPool: x.kPool, VPool: x.vPool, PageTab: s.ptab.p, TabOff: arg(argTabOff), LayerOff: s.tab.maxPages * li}
		attn := cudakern.Attn{Q: qkvP, LdQ: ld, Cache: cache, Pos: arg(argPos)}
		err := add(s.pl.MatmulRows(qkvP, ld, xP, H, L.qkv, n, ld, H))
		if err == nil {
			err = add(s.pl.RoPEKV(cudakern.RoPEKV{Q: qkvP, K: qkvP.Add(4 * Q), V: qkvP.Add(4 * (Q + KV)), LdQ: ld, LdK: ld, LdV: ld,
				Pos: arg(argPos), Cache: cache, RopeCS: w.ropeCS, RopeLen: w.ropeLen, InvFreq: w.invFreq}, n, nh, nkv))
		}
		if err == nil && p.len[argTiles] > 0 {
			err = add(s.pl.AttnPrefill(attn, attP, Q, arg(argTiles), p.len[argTiles]/2, nh, nkv, scale))
		}
		if m := p.len[argSingle]; err == nil && m > 0 {
			err = add(s.pl.AttnDecode(attn, partOP, partMLP, arg(argSingle), m, nh, nkv, splits, scale))
			if err == nil {
				err = add(s.pl.AttnCombine(attP, Q, partOP, partMLP, arg(argSingle), m, nh, splits))
			}
		}
		if err == nil {
			err = add(s.pl.MatmulRows(oP, H, attP, Q, L.o, n, H, Q))
		}
		if err == nil {
			err = add(s.pl.ResidualNorm(cudakern.ResidualNorm{H: hP, O: oP, WPost: L.in2, WNext: L.post, XOut: xP}, n, H, eps))
		}
		if err == nil {
			err = add(s.pl.MatmulRows(guP, 2*I, xP, H, L.gu, n, 2*I, H))
		}
		if err == nil {
			err = add(s.pl.SwiGLU(mmP, guP, 2*I, guP.Add(4*I), 2*I, n, I))
		}
		if err == nil {
			err = add(s.pl.MatmulRows(oP, H, mmP, I, L.down, n, H, I))
		}
		if err == nil {
			rn := cudakern.ResidualNorm{H: hP, O: oP, WPost: L.post2}
			if li+1 < len(w.layers) {
				rn.WNext, rn.XOut = w.layers[li+1].in, xP
			} else {
				rn.WMid, rn.GateW, rn.GateOut, rn.GateB = w.norm, w.exitW, gateP, w.exitB
			}
			err = add(s.pl.ResidualNorm(rn, n, H, eps))
		}
		if err != nil {
			return fmt.Errorf("CUDA backend: layer %d: %w", li, err)
		}
	}
	if err := add(s.pl.ScatterRows(s.states.p, hP, arg(argState), n, H)); err != nil {
		return err
	}
	if err := add(s.pl.ExitDecide(stP, 0, arg(argStep), gateP, cumP, chosenP, n, c.TotalUTSteps)); err != nil {
		return err
	}
	if mh > 0 {
		hx := hhP
		err := add(s.pl.GatherRows(hhP, hP, arg(argHead), mh, H))
		if err == nil && x.spec.ActBF16 {
			hx = hxP
			err = add(s.pl.CastRows(hxP, hhP, mh, H))
		}
		if err == nil {
			err = add(s.pl.MatmulRows(logitsP, V, hx, H, w.lmHead, mh, V, H))
		}
		if err == nil {
			err = add(s.pl.TopK(idsP, valsP, lseP, arg(argScoreID), scoreP, logitsP, V, mh, V, k))
		}
		if err != nil {
			return fmt.Errorf("CUDA backend: LM head: %w", err)
		}
	}
	for _, l := range ls {
		if err := s.q.Launch(l); err != nil {
			return fmt.Errorf("CUDA backend: %w", err)
		}
	}
	// Read back the scalars.
	if err := s.q.Download(exitBytes(s.exit), stP); err != nil {
		return err
	}
	s.gate = grow(s.gate, n)
	if err := s.q.Download(cudakern.AsBytes(s.gate), gateP); err != nil {
		return err
	}
	if mh > 0 {
		s.ids, s.vals, s.lse, s.scr = grow(s.ids, mh*k), grow(s.vals, mh*k), grow(s.lse, mh), grow(s.scr, mh)
		for _, d := range []struct {
			dst []byte
			src cudakern.DevicePtr
		}{{cudakern.AsBytes(s.ids), idsP}, {cudakern.AsBytes(s.vals), valsP}, {cudakern.AsBytes(s.lse), lseP}, {cudakern.AsBytes(s.scr), scoreP}} {
			if err := s.q.Download(d.dst, d.src); err != nil {
				return err
			}
		}
		if p.logits {
			s.lgt = grow(s.lgt, mh*V)
			if err := s.q.Download(cudakern.AsBytes(s.lgt), logitsP); err != nil {
				return err
			}
		}
	}
	s.fill(b)
	return nil
}

// fill writes the rows' outputs from the downloaded scalars.
func (s *stream) fill(b *engine.Batch) {
	p := &s.plan
	V := s.x.cfg.VocabSize
	s.top = s.top[:0]
	for i, r := range b.Rows {
		st := s.exit[i]
		out := engine.RowOut{Gate: s.gate[i], Exit: engine.ExitState{Rest: st.Rest, Cum: st.Cum, Chosen: int(st.Chosen)}}
		decided := r.ExitIn.Chosen < 0 && out.Exit.Chosen == r.Step
		if h := p.headOf[i]; h >= 0 && (r.Head.Every || (r.Head.AtExit && decided)) {
			k := p.k
			lse := s.lse[h]
			out.Ran = true
			out.Argmax = int(s.ids[h*k])
			out.Logprob = s.vals[h*k] - lse
			if r.Head.Score {
				out.Score = s.scr[h]
			}
			var logits []float32
			if p.logits {
				logits = s.lgt[h*V : (h+1)*V]
			}
			if r.Head.Top > 0 {
				start := len(s.top)
				if r.Head.Top <= k {
					for j := range r.Head.Top {
						id := int(s.ids[h*k+j])
						if id < 0 {
							break
						}
						s.top = append(s.top, engine.Logprob{ID: id, Logprob: s.vals[h*k+j] - lse})
					}
				} else {
					s.top = engine.TopLogprobs(s.top, logits, r.Head.Top, float64(lse))
				}
				out.Top = s.top[start:len(s.top):len(s.top)]
			}
			if r.Head.Logits {
				out.Logits = logits
			}
		}
		b.Out[i] = out
	}
}

func grow[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n)
	}
	return s[:n]
}

func exitBytes(st []cudakern.ExitState) []byte {
	if len(st) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&st[0])), len(st)*int(unsafe.Sizeof(st[0])))
}
