// Package cuda is the CUDA backend: the engine's loop step (engine.Backend) on an NVIDIA GPU
// through cudakern (driver API, NVRTC-compiled kernels, purego bindings: no cgo).
//
// Load uploads the weights once as bf16 (the attention and MLP projections fused: [Wq; Wk; Wv]
// and [Wgate; Wup]), the norms and gate as f32, the rotation table, and allocates the paged KV
// pools in device memory: Block-position pages, one per (cache slot, layer), counted against
// the KV budget the executor reports (KVCapacity). A stream keeps its rows' hidden states and
// its page table on the device; each Step plans the batch on the host (plan.go: validated rows,
// per-row int32 arguments, prefill tiles and decode rows, head rows) and queues one launch
// sequence: gather of the rows' states (and embedding of step-0 rows), per layer the fused
// QKV product, RoPE with the cache write, prefill/decode attention, the output product and the
// fused residual + sandwich norms, SwiGLU and the down product, then the final norm with the
// gate logit, the exit decision on the device, the scatter of the new states and the LM head
// with top-k for the rows that need it. Only O(rows) scalars come back (exit states, gates,
// top-k ids and log-probabilities), plus logits for rows that ask for them.
//
// Products use cudakern's matmul_rows, whose sums do not depend on the batch: the engine's
// batch invariance holds. CUDA graphs are not captured yet: every step is launched kernel by
// kernel.
//
// The driver calls sit behind the device and queue interfaces (device.go) so that all of the
// host logic is tested on machines without a GPU, by executing the planned launches with a
// CPU interpreter and comparing with the reference backend.
package cuda

import (
	"context"
	"fmt"
	"math"

	"github.com/loopserve/loopserve/cudakern"
	"github.com/loopserve/loopserve/runtime/backend/host"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// kvPage is the positions of a KV page: the engine's block.
const kvPage = host.Block

// Options configure a Backend.
type Options struct {
	Device int // CUDA device ordinal
	// KVBytes is the device memory given to the KV pools; 0: 90% of what is free after the
	// weights and the streams' working memory reserve (WorkBytes).
	KVBytes int64
	// WorkBytes is the device memory left for streams' states and scratch when KVBytes is 0;
	// 0: 1 GiB.
	WorkBytes int64
	// MaxPositions bounds one cache's positions (the page table's width); 0: the model's
	// max_position_embeddings, at most 8192.
	MaxPositions int
	// BF16 feeds the products bf16 activations (half the activation traffic; cuBLASLt's
	// tensor-core input type). The default is f32 activations against the bf16 weights: on
	// the golden models bf16 activations miss the 2e-2 logit tolerance (as the CPU backend's
	// bf16 numerics do), so they are opt-in.
	BF16 bool
}

// Backend is the CUDA backend. Safe for concurrent use.
type Backend struct {
	o    Options
	open func(spec cudakern.Spec) (device, error)
}

var _ engine.Backend = (*Backend)(nil)

// New returns a backend on device o.Device. Nothing is loaded until Load.
func New(o Options) *Backend {
	return &Backend{o: o, open: func(spec cudakern.Spec) (device, error) {
		return openGPU(context.Background(), o.Device, spec)
	}}
}

// Available reports why no CUDA device can be used here (nil when one can): the driver's
// library lookup error (wrapping cudakern.ErrLibraryNotFound, naming libcuda.so.1) or
// cudakern.ErrNoDevice.
func Available() error {
	d, err := cudakern.LoadDriver()
	if err != nil {
		return err
	}
	n, err := d.DeviceCount()
	if err != nil {
		return err
	}
	if n == 0 {
		return fmt.Errorf("%s: %w", d.Path(), cudakern.ErrNoDevice)
	}
	_, err = cudakern.LoadNVRTC()
	return err
}

// weights are the device copies of a model's parameters.
type weights struct {
	embed, lmHead, norm, exitW cudakern.DevicePtr
	layers                     []layerWeights
	ropeCS, invFreq            cudakern.DevicePtr
	ropeLen                    int
	exitB                      float32
}

type layerWeights struct {
	qkv, o, gu, down     cudakern.DevicePtr // bf16 [Q+2KV, H], [H, Q], [2I, H], [H, I]
	in, in2, post, post2 cudakern.DevicePtr // f32 [H]
}

type executor struct {
	dev      device
	m        *model.Model
	cfg      model.Config
	spec     cudakern.Spec
	w        weights
	allocs   []cudakern.DevicePtr
	kPool    cudakern.DevicePtr
	vPool    cudakern.DevicePtr
	pages    *pages
	npages   int
	pageB    int64 // bytes of one page, K and V
	maxPages int
	kvBF16   bool
}

// Load implements engine.Backend.
func (b *Backend) Load(m *model.Model, o engine.LoadOptions) (engine.Executor, error) {
	if m == nil {
		return nil, fmt.Errorf("CUDA backend: no model")
	}
	c := m.Config
	spec := cudakern.Spec{HeadDim: c.HeadDimOrDefault(), KVPage: kvPage, ActBF16: b.o.BF16, KVBF16: o.KVBF16}
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("CUDA backend: %w", err)
	}
	for _, k := range []struct {
		what string
		n    int
	}{{"hidden size", c.HiddenSize}, {"intermediate size", c.IntermediateSize}, {"attention width", c.QDim()}} {
		if k.n%8 != 0 {
			return nil, fmt.Errorf("CUDA backend: %s %d is not a multiple of 8", k.what, k.n)
		}
	}
	dev, err := b.open(spec)
	if err != nil {
		return nil, fmt.Errorf("CUDA backend: %w", err)
	}
	x := &executor{dev: dev, m: m, cfg: c, spec: spec, kvBF16: o.KVBF16}
	if err := x.load(b.o); err != nil {
		_ = x.Close()
		return nil, fmt.Errorf("CUDA backend: loading %s: %w", m.Dir, err)
	}
	return x, nil
}

func (x *executor) alloc(bytes int) (cudakern.DevicePtr, error) {
	p, err := x.dev.Alloc(bytes)
	if err != nil {
		return 0, err
	}
	x.allocs = append(x.allocs, p)
	return p, nil
}

// put allocates and writes v.
func put[T any](x *executor, v []T) (cudakern.DevicePtr, error) {
	b := cudakern.AsBytes(v)
	p, err := x.alloc(len(b))
	if err != nil {
		return 0, err
	}
	return p, x.dev.Write(p, b)
}

// bf16Rows concatenates matrices' rows as bf16 bits (f32 weights rounded).
func bf16Rows(ms ...*model.Matrix) []uint16 {
	var out []uint16
	for _, m := range ms {
		if m.BF16 != nil {
			out = append(out, m.BF16...)
			continue
		}
		for _, v := range m.F32 {
			out = append(out, model.F32ToBF16(v))
		}
	}
	return out
}

func (x *executor) load(o Options) error {
	c, m := x.cfg, x.m
	var err error
	w := &x.w
	if w.embed, err = put(x, bf16Rows(&m.Embed)); err != nil {
		return err
	}
	if w.lmHead, err = put(x, bf16Rows(&m.LMHead)); err != nil {
		return err
	}
	if w.norm, err = put(x, m.Norm); err != nil {
		return err
	}
	if w.exitW, err = put(x, m.ExitW); err != nil {
		return err
	}
	w.exitB = m.ExitB
	for i := range m.Layers {
		L := &m.Layers[i]
		var lw layerWeights
		for _, t := range []struct {
			dst *cudakern.DevicePtr
			v   []uint16
		}{{&lw.qkv, bf16Rows(&L.Q, &L.K, &L.V)}, {&lw.o, bf16Rows(&L.O)}, {&lw.gu, bf16Rows(&L.Gate, &L.Up)}, {&lw.down, bf16Rows(&L.Down)}} {
			if *t.dst, err = put(x, t.v); err != nil {
				return fmt.Errorf("layer %d: %w", i, err)
			}
		}
		for _, t := range []struct {
			dst *cudakern.DevicePtr
			v   []float32
		}{{&lw.in, L.InputNorm}, {&lw.in2, L.InputNorm2}, {&lw.post, L.PostAttnNorm}, {&lw.post2, L.PostAttnNorm2}} {
			if *t.dst, err = put(x, t.v); err != nil {
				return fmt.Errorf("layer %d: %w", i, err)
			}
		}
		w.layers = append(w.layers, lw)
	}
	hd := c.HeadDimOrDefault()
	inv := invFreq(hd, c.RopeTheta)
	maxPos := o.MaxPositions
	if maxPos <= 0 {
		maxPos = min(max(c.MaxPositionEmbeddings, kvPage), 8192)
	}
	x.maxPages = (maxPos + kvPage - 1) / kvPage
	w.ropeLen = x.maxPages * kvPage
	if w.invFreq, err = put(x, inv); err != nil {
		return err
	}
	if w.ropeCS, err = put(x, cudakern.RoPETable(inv, w.ropeLen)); err != nil {
		return err
	}
	// The KV pools.
	elem := int64(4)
	if x.kvBF16 {
		elem = 2
	}
	x.pageB = 2 * kvPage * int64(c.KVDim()) * elem
	kvBytes := o.KVBytes
	if kvBytes <= 0 {
		free, _, err := x.dev.MemInfo()
		if err != nil {
			return err
		}
		work := o.WorkBytes
		if work <= 0 {
			work = 1 << 30
		}
		kvBytes = (int64(free) - work) / 10 * 9
	}
	x.npages = int(kvBytes / x.pageB)
	if x.npages < c.NumHiddenLayers {
		return fmt.Errorf("%d bytes for KV pools: not one block of one cache (%d bytes): %w", kvBytes, x.pageB*int64(c.NumHiddenLayers), ErrKVFull)
	}
	half := int(x.pageB / 2)
	if x.kPool, err = x.alloc(x.npages * half); err != nil {
		return fmt.Errorf("KV pool of %d pages: %w", x.npages, err)
	}
	if x.vPool, err = x.alloc(x.npages * half); err != nil {
		return fmt.Errorf("KV pool of %d pages: %w", x.npages, err)
	}
	x.pages = newPages(x.npages)
	return nil
}

// invFreq is RoPE's per-pair frequencies, as the reference backend computes them.
func invFreq(hd int, theta float64) []float32 {
	f := make([]float32, hd/2)
	for i := range f {
		f[i] = float32(1 / math.Pow(theta, float64(2*i)/float64(hd)))
	}
	return f
}

func (x *executor) KVBlock() int { return kvPage }

// KVBlockBytes is host.BlockBytes: slots×layers pages, keys and values.
func (x *executor) KVBlockBytes(slots int) int64 { return host.BlockBytes(x.cfg, slots, x.kvBF16) }

// KVCapacity implements engine.KVCapacitor: the bytes of the KV pools.
func (x *executor) KVCapacity() (int64, error) { return int64(x.npages) * x.pageB, nil }

func (x *executor) Close() error {
	for _, p := range x.allocs {
		x.dev.Free(p)
	}
	x.allocs = nil
	return x.dev.Close()
}

func (x *executor) NewStream() (engine.Stream, error) {
	q, err := x.dev.NewQueue()
	if err != nil {
		return nil, fmt.Errorf("CUDA backend: a stream: %w", err)
	}
	return &stream{x: x, q: q, pl: x.dev.Planner(), tab: newTable(x.cfg.NumHiddenLayers, x.maxPages)}, nil
}
