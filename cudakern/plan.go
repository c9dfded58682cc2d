package cudakern

import (
	"fmt"
	"math"
)

// Planner shapes the kernels' launches: grid, block, dynamic shared memory and the argument
// list in each kernel's parameter order, after checking the shapes the kernel relies on. It
// makes no driver call, so all of this is tested on machines without a GPU. Buffer shapes are
// written [rows, columns] (row-major) with the row stride ("ld") in elements.
type Planner struct {
	Spec      Spec
	MaxShared int // the device's opt-in shared memory per block (Props.MaxSharedOptin); 0: 48 KiB
}

// Block sizes and tiles, as the kernels are written for them (kernels/*.cu).
const (
	normThreads = 256
	ropeThreads = 128
	copyThreads = 128
	rowThreads  = 256 // swiglu, gather_rows, scatter_rows: one thread per column
	exitThreads = 128
	topkThreads = 256
	decThreads  = 128
	mmRows      = 8  // matmul_rows: input rows per block
	mmWarps     = 8  // matmul_rows: output columns per block
	pfRows      = 16 // attn_prefill: PF_BQ
	pfKeys      = 32 // attn_prefill: PF_BK
	pfThreads   = 128
)

// DecodeChunk is the positions one attn_decode block covers. It is a constant, not a function
// of the batch, so that a row's split-K sums never depend on the other rows.
const DecodeChunk = 128

// MaxTopK is the largest k topk serves (OpenAI's top_logprobs stops at 20; sampling's top-k
// beyond this needs the row's logits).
const MaxTopK = 64

func (p Planner) maxShared() int {
	if p.MaxShared > 0 {
		return p.MaxShared
	}
	return defaultShared
}

// sharedNeed is the dynamic shared memory a kernel needs whatever the shapes (0: none or
// shape-dependent and checked when planned).
func (p Planner) sharedNeed(kernel string) int {
	if kernel == "attn_prefill" {
		return p.PrefillShared()
	}
	return 0
}

// PrefillShared is attn_prefill's dynamic shared memory, bytes: a query tile, a K tile
// (padded by one column), a V tile, the score tile and three per-row statistics.
func (p Planner) PrefillShared() int {
	hd := p.Spec.HeadDim
	return 4 * (pfRows*hd + pfKeys*(hd+1) + pfKeys*hd + pfRows*pfKeys + 3*pfRows)
}

// DecodeShared is attn_decode's dynamic shared memory for g query heads per kv head, bytes.
func (p Planner) DecodeShared(g int) int {
	return 4 * (g*p.Spec.HeadDim + g*DecodeChunk + 2*g)
}

// DecodeSplits is how many DecodeChunk-position splits cover positions [0, maxPos].
func DecodeSplits(maxPos int) int { return maxPos/DecodeChunk + 1 }

// DecodeScratch is the size of attn_decode's partial results for n rows, nh heads and splits
// splits: part_o [n, nh, splits, HeadDim] and part_ml [n, nh, splits, 2], f32, bytes.
func (p Planner) DecodeScratch(n, nh, splits int) (partO, partML int) {
	return 4 * n * nh * splits * p.Spec.HeadDim, 4 * n * nh * splits * 2
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

func blockFor(cols, most int) uint32 {
	b := min(most, ceilDiv(max(cols, 1), 32)*32)
	return uint32(b)
}

func errShape(kernel, format string, args ...any) error {
	return fmt.Errorf("%s: %s: %w", kernel, fmt.Sprintf(format, args...), ErrLaunch)
}

func rows(kernel string, n int, limit int) error {
	if n < 1 || n > limit {
		return errShape(kernel, "%d rows, want 1..%d", n, limit)
	}
	return nil
}

func (p Planner) heads(kernel string, nh, nkv int) error {
	if nh < 1 || nkv < 1 || nh%nkv != 0 {
		return errShape(kernel, "%d heads over %d kv heads", nh, nkv)
	}
	return nil
}

// Embed plans h[n, cols] (f32) = table[ids[n]] (bf16 [vocab, cols]).
func (p Planner) Embed(h, table, ids DevicePtr, n, cols, vocab int) (Launch, error) {
	if err := rows("embed", n, math.MaxInt32); err != nil {
		return Launch{}, err
	}
	l := Launch{Kernel: "embed", Grid: Dim3{uint32(n), 1, 1}, Block: Dim3{blockFor(cols, normThreads), 1, 1}}
	l.Args.Ptr(h).Ptr(table).Ptr(ids).Int(n).Int(cols).Int(vocab)
	return l, nil
}

// RMSNorm plans out[n, cols] (act) = rmsnorm(x[n, cols] f32) · w[cols].
func (p Planner) RMSNorm(out, x, w DevicePtr, n, cols int, eps float32) (Launch, error) {
	if err := rows("rmsnorm", n, math.MaxInt32); err != nil {
		return Launch{}, err
	}
	l := Launch{Kernel: "rmsnorm", Grid: Dim3{uint32(n), 1, 1}, Block: Dim3{blockFor(cols, normThreads), 1, 1}}
	l.Args.Ptr(out).Ptr(x).Ptr(w).Int(n).Int(cols).Float(eps)
	return l, nil
}

// CastRows plans out[n, cols] (act) = x[n, cols] (f32).
func (p Planner) CastRows(out, x DevicePtr, n, cols int) (Launch, error) {
	if err := rows("cast_rows", n, math.MaxInt32); err != nil {
		return Launch{}, err
	}
	l := Launch{Kernel: "cast_rows", Grid: Dim3{uint32(n), 1, 1}, Block: Dim3{blockFor(cols, normThreads), 1, 1}}
	l.Args.Ptr(out).Ptr(x).Int(n).Int(cols)
	return l, nil
}

// ResidualNorm is residual_norm's buffers (see kernels/norm.cu); WMid, WNext and GateW are
// optional (0), XOut goes with WNext and GateOut with GateW.
type ResidualNorm struct {
	H, O               DevicePtr // [n, cols] f32: the residual stream (updated) and the sublayer output
	WPost, WMid, WNext DevicePtr // [cols] f32 norm weights
	XOut               DevicePtr // [n, cols] act
	GateW, GateOut     DevicePtr // [cols] f32, [n] f32
	GateB              float32
}

// ResidualNorm plans the fused residual add and sandwich norms of kernels/norm.cu.
func (p Planner) ResidualNorm(a ResidualNorm, n, cols int, eps float32) (Launch, error) {
	const k = "residual_norm"
	if err := rows(k, n, math.MaxInt32); err != nil {
		return Launch{}, err
	}
	switch {
	case a.H == 0 || a.O == 0 || a.WPost == 0:
		return Launch{}, errShape(k, "h, o and w_post are required")
	case (a.WNext == 0) != (a.XOut == 0):
		return Launch{}, errShape(k, "w_next and x_out go together")
	case (a.GateW == 0) != (a.GateOut == 0):
		return Launch{}, errShape(k, "gate_w and gate_out go together")
	}
	l := Launch{Kernel: k, Grid: Dim3{uint32(n), 1, 1}, Block: Dim3{blockFor(cols, normThreads), 1, 1}}
	l.Args.Ptr(a.H).Ptr(a.O).Ptr(a.WPost).Ptr(a.WMid).Ptr(a.WNext).Ptr(a.XOut).
		Ptr(a.GateW).Float(a.GateB).Ptr(a.GateOut).Int(n).Int(cols).Float(eps)
	return l, nil
}

// KVCache is where a batch's rows keep keys and values (see kernels/common.cuh): the pools,
// the page table and, per row, the offset of its cache's page list for layer 0; LayerOff
// selects the layer (CacheLayout computes both).
type KVCache struct {
	KPool, VPool DevicePtr // [pages, KVPage, nkv·HeadDim] kv
	PageTab      DevicePtr // int32 page lists
	TabOff       DevicePtr // [n] int32
	LayerOff     int
}

// RoPEKV is rope_kv's buffers: the row's q, k and v (f32, each with its row stride), positions,
// the cache, and the rotation tables (RoPETable, RopeLen positions; InvFreq [HeadDim/2]).
type RoPEKV struct {
	Q, K, V       DevicePtr
	LdQ, LdK, LdV int
	Pos           DevicePtr // [n] int32
	Cache         KVCache
	RopeCS        DevicePtr
	RopeLen       int
	InvFreq       DevicePtr
}

// RoPEKV plans rotating q in place and writing rotated k and v into the cache.
func (p Planner) RoPEKV(a RoPEKV, n, nh, nkv int) (Launch, error) {
	const k = "rope_kv"
	hd := p.Spec.HeadDim
	if err := rows(k, n, math.MaxInt32); err != nil {
		return Launch{}, err
	}
	if err := p.heads(k, nh, nkv); err != nil {
		return Launch{}, err
	}
	if a.LdQ < nh*hd || a.LdK < nkv*hd || a.LdV < nkv*hd {
		return Launch{}, errShape(k, "row strides %d/%d/%d below %d/%d", a.LdQ, a.LdK, a.LdV, nh*hd, nkv*hd)
	}
	l := Launch{Kernel: k, Grid: Dim3{uint32(n), 1, 1}, Block: Dim3{ropeThreads, 1, 1}}
	c := a.Cache
	l.Args.Ptr(a.Q).Int(a.LdQ).Ptr(a.K).Int(a.LdK).Ptr(a.V).Int(a.LdV).Ptr(a.Pos).Ptr(c.TabOff).
		Ptr(c.PageTab).Int(c.LayerOff).Ptr(c.KPool).Ptr(c.VPool).Ptr(a.RopeCS).Int(a.RopeLen).Ptr(a.InvFreq).
		Int(n).Int(nh).Int(nkv)
	return l, nil
}

// KVCopy plans m position copies between caches (kv_copy; KVCopies builds the job arrays,
// whose offsets include the layer).
func (p Planner) KVCopy(kPool, vPool, pageTab, srcOff, srcPos, dstOff, dstPos DevicePtr, m, kvDim int) (Launch, error) {
	if err := rows("kv_copy", m, math.MaxInt32); err != nil {
		return Launch{}, err
	}
	l := Launch{Kernel: "kv_copy", Grid: Dim3{uint32(m), 1, 1}, Block: Dim3{copyThreads, 1, 1}}
	l.Args.Ptr(kPool).Ptr(vPool).Ptr(pageTab).Ptr(srcOff).Ptr(srcPos).Ptr(dstOff).Ptr(dstPos).Int(m).Int(kvDim)
	return l, nil
}

// Attn is the inputs every attention kernel reads.
type Attn struct {
	Q     DevicePtr // [*, LdQ] f32, rotated
	LdQ   int
	Cache KVCache
	Pos   DevicePtr // [rows] int32
}

// AttnDecode plans split-K attention of n decode rows (rows: their batch rows, or 0 for
// 0..n-1) over splits splits (DecodeSplits of the largest position the launch may see: a
// captured graph may cover more positions than its rows have yet). partO/partML are
// DecodeScratch-sized.
func (p Planner) AttnDecode(a Attn, partO, partML, rowIdx DevicePtr, n, nh, nkv, splits int, scale float32) (Launch, error) {
	const k = "attn_decode"
	if err := rows(k, n, maxGridY); err != nil {
		return Launch{}, err
	}
	if err := p.heads(k, nh, nkv); err != nil {
		return Launch{}, err
	}
	if splits < 1 || splits > maxGridZ {
		return Launch{}, errShape(k, "%d splits", splits)
	}
	if a.LdQ < nh*p.Spec.HeadDim {
		return Launch{}, errShape(k, "q stride %d below %d", a.LdQ, nh*p.Spec.HeadDim)
	}
	sh := p.DecodeShared(nh / nkv)
	if sh > defaultShared {
		return Launch{}, errShape(k, "%d query heads per kv head need %d bytes of shared memory", nh/nkv, sh)
	}
	l := Launch{Kernel: k, Grid: Dim3{uint32(nkv), uint32(n), uint32(splits)}, Block: Dim3{decThreads, 1, 1}, Shared: uint32(sh)}
	c := a.Cache
	l.Args.Ptr(partO).Ptr(partML).Ptr(a.Q).Int(a.LdQ).Ptr(c.KPool).Ptr(c.VPool).Ptr(c.PageTab).Ptr(c.TabOff).
		Int(c.LayerOff).Ptr(a.Pos).Ptr(rowIdx).Int(n).Int(nh).Int(nkv).Int(DecodeChunk).Float(scale)
	return l, nil
}

// AttnCombine plans merging AttnDecode's splits into out [*, ldo] (act).
func (p Planner) AttnCombine(out DevicePtr, ldo int, partO, partML, rowIdx DevicePtr, n, nh, splits int) (Launch, error) {
	const k = "attn_combine"
	if err := rows(k, n, maxGridY); err != nil {
		return Launch{}, err
	}
	if ldo < nh*p.Spec.HeadDim {
		return Launch{}, errShape(k, "out stride %d below %d", ldo, nh*p.Spec.HeadDim)
	}
	l := Launch{Kernel: k, Grid: Dim3{uint32(nh), uint32(n), 1}, Block: Dim3{blockFor(p.Spec.HeadDim, 256), 1, 1}}
	l.Args.Ptr(out).Int(ldo).Ptr(partO).Ptr(partML).Ptr(rowIdx).Int(n).Int(nh).Int(splits)
	return l, nil
}

// AttnPrefill plans tiled attention over ntiles tiles (PlanTiles) into out [*, ldo] (act).
func (p Planner) AttnPrefill(a Attn, out DevicePtr, ldo int, tiles DevicePtr, ntiles, nh, nkv int, scale float32) (Launch, error) {
	const k = "attn_prefill"
	if err := rows(k, ntiles, maxGridY); err != nil {
		return Launch{}, err
	}
	if err := p.heads(k, nh, nkv); err != nil {
		return Launch{}, err
	}
	if a.LdQ < nh*p.Spec.HeadDim || ldo < nh*p.Spec.HeadDim {
		return Launch{}, errShape(k, "strides %d/%d below %d", a.LdQ, ldo, nh*p.Spec.HeadDim)
	}
	sh := p.PrefillShared()
	if sh > p.maxShared() {
		return Launch{}, errShape(k, "head dim %d needs %d bytes of shared memory, the device allows %d", p.Spec.HeadDim, sh, p.maxShared())
	}
	l := Launch{Kernel: k, Grid: Dim3{uint32(nh), uint32(ntiles), 1}, Block: Dim3{pfThreads, 1, 1}, Shared: uint32(sh)}
	c := a.Cache
	l.Args.Ptr(out).Int(ldo).Ptr(a.Q).Int(a.LdQ).Ptr(c.KPool).Ptr(c.VPool).Ptr(c.PageTab).Ptr(c.TabOff).
		Int(c.LayerOff).Ptr(a.Pos).Ptr(tiles).Int(ntiles).Int(nh).Int(nkv).Float(scale)
	return l, nil
}

// PlanTiles splits a batch's rows by cache (tabOff, one per row): each run of consecutive rows
// on one cache becomes prefill tiles of at most 16 rows (tiles: first row, row count pairs);
// a row alone on its cache goes to the decode kernel (single).
func PlanTiles(tabOff []int32) (tiles, single []int32) {
	for r := 0; r < len(tabOff); {
		end := r + 1
		for end < len(tabOff) && tabOff[end] == tabOff[r] {
			end++
		}
		if end-r == 1 {
			single = append(single, int32(r))
		} else {
			for s := r; s < end; s += pfRows {
				tiles = append(tiles, int32(s), int32(min(pfRows, end-s)))
			}
		}
		r = end
	}
	return tiles, single
}

// MatmulRows plans out[n, N] (f32, stride ldo) = x[n, K] (act, stride ldx) · w[N, K]ᵀ (bf16),
// the batch-invariant small-batch product.
func (p Planner) MatmulRows(out DevicePtr, ldo int, x DevicePtr, ldx int, w DevicePtr, n, N, K int) (Launch, error) {
	const k = "matmul_rows"
	switch {
	case n < 1 || ceilDiv(n, mmRows) > maxGridY:
		return Launch{}, errShape(k, "%d rows", n)
	case N < 1 || K < 8 || K%8 != 0:
		return Launch{}, errShape(k, "[%d, %d] weight: want K a positive multiple of 8", N, K)
	case ldx < K || ldx%8 != 0 || ldo < N:
		return Launch{}, errShape(k, "strides x %d (≥ K, multiple of 8), out %d (≥ N)", ldx, ldo)
	}
	l := Launch{Kernel: k, Grid: Dim3{uint32(ceilDiv(N, mmWarps)), uint32(ceilDiv(n, mmRows)), 1}, Block: Dim3{32 * mmWarps, 1, 1}}
	l.Args.Ptr(out).Int(ldo).Ptr(x).Int(ldx).Ptr(w).Int(n).Int(N).Int(K)
	return l, nil
}

// SwiGLU plans out[n, cols] (act) = silu(g) · u (f32, each with its row stride).
func (p Planner) SwiGLU(out, g DevicePtr, ldg int, u DevicePtr, ldu, n, cols int) (Launch, error) {
	const k = "swiglu"
	if err := rows(k, n, maxGridY); err != nil {
		return Launch{}, err
	}
	if ldg < cols || ldu < cols {
		return Launch{}, errShape(k, "strides %d/%d below %d", ldg, ldu, cols)
	}
	l := Launch{Kernel: k, Grid: Dim3{uint32(ceilDiv(cols, rowThreads)), uint32(n), 1}, Block: Dim3{rowThreads, 1, 1}}
	l.Args.Ptr(out).Ptr(g).Int(ldg).Ptr(u).Int(ldu).Int(n).Int(cols)
	return l, nil
}

// ExitState is a token's exit bookkeeping on the device (kernels/select.cu's ExitState).
type ExitState struct {
	Rest, Cum, Tau float32
	MaxDepth       int32
	Forced         int32
	Chosen         int32
}

// NewExitState is the state of a token before its first loop step.
func NewExitState(tau float32, maxDepth int, forced bool) ExitState {
	s := ExitState{Rest: 1, Tau: tau, MaxDepth: int32(maxDepth), Chosen: -1}
	if forced {
		s.Forced = 1
	}
	return s
}

// ExitDecide plans applying each row's gate logit at its step (step [n]) to its state
// (st[slot[i]], slot 0: st[i]), writing the cumulative exit probability and the exit step.
func (p Planner) ExitDecide(st, slot, step, gateLogit, cumOut, chosenOut DevicePtr, n, R int) (Launch, error) {
	if err := rows("exit_decide", n, math.MaxInt32); err != nil {
		return Launch{}, err
	}
	l := Launch{Kernel: "exit_decide", Grid: Dim3{uint32(ceilDiv(n, exitThreads)), 1, 1}, Block: Dim3{exitThreads, 1, 1}}
	l.Args.Ptr(st).Ptr(slot).Ptr(step).Ptr(gateLogit).Ptr(cumOut).Ptr(chosenOut).Int(n).Int(R)
	return l, nil
}

// TopK plans the k best ids and logits of each row of logits [n, ld] (ids/vals [n, k]) and,
// with lse non-zero, each row's log-sum-exp [n]; with scoreID [n] also the log-probability of
// token scoreID[r] in scoreOut [n].
func (p Planner) TopK(ids, vals, lse, scoreID, scoreOut, logits DevicePtr, ld, n, vocab, k int) (Launch, error) {
	const name = "topk"
	if err := rows(name, n, math.MaxInt32); err != nil {
		return Launch{}, err
	}
	if k < 1 || k > MaxTopK || k > vocab || ld < vocab {
		return Launch{}, errShape(name, "k %d of vocab %d (at most %d), stride %d", k, vocab, MaxTopK, ld)
	}
	if (scoreID == 0) != (scoreOut == 0) || (scoreID != 0 && lse == 0) {
		return Launch{}, errShape(name, "score_id, score_out and lse go together")
	}
	l := Launch{Kernel: name, Grid: Dim3{uint32(n), 1, 1}, Block: Dim3{topkThreads, 1, 1}}
	l.Args.Ptr(ids).Ptr(vals).Ptr(lse).Ptr(scoreID).Ptr(scoreOut).Ptr(logits).Int(ld).Int(n).Int(vocab).Int(k)
	return l, nil
}

// GatherRows plans dst[i] = src[idx[i]] for m rows of cols f32.
func (p Planner) GatherRows(dst, src, idx DevicePtr, m, cols int) (Launch, error) {
	return p.rowCopy("gather_rows", dst, src, idx, m, cols)
}

// ScatterRows plans dst[idx[i]] = src[i] for m rows of cols f32 (idx distinct).
func (p Planner) ScatterRows(dst, src, idx DevicePtr, m, cols int) (Launch, error) {
	return p.rowCopy("scatter_rows", dst, src, idx, m, cols)
}

func (p Planner) rowCopy(k string, dst, src, idx DevicePtr, m, cols int) (Launch, error) {
	if err := rows(k, m, maxGridY); err != nil {
		return Launch{}, err
	}
	l := Launch{Kernel: k, Grid: Dim3{uint32(ceilDiv(cols, rowThreads)), uint32(m), 1}, Block: Dim3{rowThreads, 1, 1}}
	l.Args.Ptr(dst).Ptr(src).Ptr(idx).Int(m).Int(cols)
	return l, nil
}

// CacheLayout places the page lists of every cache in the page table: the list of sequence
// slot s, cache slot t (the loop step under the full KV policy, 0 under last) and layer l
// starts at ((s·Slots + t)·Layers + l)·MaxPages.
type CacheLayout struct {
	Seqs, Slots, Layers, MaxPages int
}

// Validate reports a layout whose offsets do not fit the kernels' int32 arguments.
func (c CacheLayout) Validate() error {
	if c.Seqs < 1 || c.Slots < 1 || c.Layers < 1 || c.MaxPages < 1 {
		return fmt.Errorf("cache layout %+v: every count must be positive", c)
	}
	if n := int64(c.Seqs) * int64(c.Slots) * int64(c.Layers) * int64(c.MaxPages); n > math.MaxInt32 {
		return fmt.Errorf("cache layout %+v: %d page table entries do not fit int32 offsets", c, n)
	}
	return nil
}

// TableLen is the page table's length, entries.
func (c CacheLayout) TableLen() int { return c.Seqs * c.Slots * c.Layers * c.MaxPages }

// TabOff is a row's tab_off: the list of its sequence's cache slot at layer 0.
func (c CacheLayout) TabOff(seq, slot int) int32 {
	return int32((seq*c.Slots + slot) * c.Layers * c.MaxPages)
}

// LayerOff is the offset a layer's launches add to every row's tab_off.
func (c CacheLayout) LayerOff(layer int) int { return layer * c.MaxPages }

// KVCopies is kv_copy's job list: per position copied, the source list offset and
// position, the destination list offset and position.
type KVCopies struct {
	SrcOff, SrcPos, DstOff, DstPos []int32
}

// Len is the number of jobs.
func (j *KVCopies) Len() int { return len(j.SrcOff) }

// Reset empties the list, keeping its memory.
func (j *KVCopies) Reset() {
	j.SrcOff, j.SrcPos, j.DstOff, j.DstPos = j.SrcOff[:0], j.SrcPos[:0], j.DstOff[:0], j.DstPos[:0]
}

// AppendCopies appends the jobs copying n positions from srcPos of (srcSeq, srcSlot) to dstPos
// of (dstSeq, dstSlot), in every layer: the engine's KV copies (the full policy's fill of the
// steps a token skipped, probes, chunked prefill), expressed in this layout.
func (c CacheLayout) AppendCopies(j *KVCopies, srcSeq, srcSlot, srcPos, dstSeq, dstSlot, dstPos, n int) {
	for l := 0; l < c.Layers; l++ {
		so, do := c.TabOff(srcSeq, srcSlot)+int32(c.LayerOff(l)), c.TabOff(dstSeq, dstSlot)+int32(c.LayerOff(l))
		for i := range n {
			j.SrcOff = append(j.SrcOff, so)
			j.SrcPos = append(j.SrcPos, int32(srcPos+i))
			j.DstOff = append(j.DstOff, do)
			j.DstPos = append(j.DstPos, int32(dstPos+i))
		}
	}
}

// RoPETable is rope_kv's rotation table for positions [0, n): [n, len(invFreq), 2] f32 (cos,
// sin) of float32(p)·invFreq[i], each a float64 sin/cos rounded to float32, as the CPU backend
// computes them, so both rotate identically.
func RoPETable(invFreq []float32, n int) []float32 {
	half := len(invFreq)
	t := make([]float32, n*half*2)
	for p := 0; p < n; p++ {
		for i, f := range invFreq {
			s, c := math.Sincos(float64(float32(p) * f))
			t[(p*half+i)*2], t[(p*half+i)*2+1] = float32(c), float32(s)
		}
	}
	return t
}
