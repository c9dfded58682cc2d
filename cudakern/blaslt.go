package cudakern

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

// BLASLt is cuBLASLt (libcublasLt), bound through purego: the bf16 tensor-core GEMM for
// batches too large for matmul_rows. Its results may depend on the batch size (the library
// picks its algorithm by shape), so the batch-invariant check mode uses matmul_rows.
type BLASLt struct {
	lib     *library
	version int

	cublasLtCreate                       func(h *uintptr) int32
	cublasLtDestroy                      func(h uintptr) int32
	cublasLtGetVersion                   func() uintptr
	cublasLtMatmulDescCreate             func(d *uintptr, compute, scale int32) int32
	cublasLtMatmulDescDestroy            func(d uintptr) int32
	cublasLtMatmulDescSetAttribute       func(d uintptr, attr int32, buf unsafe.Pointer, size uintptr) int32
	cublasLtMatrixLayoutCreate           func(l *uintptr, typ int32, rows, cols uint64, ld int64) int32
	cublasLtMatrixLayoutDestroy          func(l uintptr) int32
	cublasLtMatmulPreferenceCreate       func(p *uintptr) int32
	cublasLtMatmulPreferenceDestroy      func(p uintptr) int32
	cublasLtMatmulPreferenceSetAttribute func(p uintptr, attr int32, buf unsafe.Pointer, size uintptr) int32
	cublasLtMatmulAlgoGetHeuristic       func(h, op, a, b, c, d, pref uintptr, req int32, res *ltHeuristic, n *int32) int32
	cublasLtMatmul                       uintptr // 16 arguments, through ccall
}

var (
	bltOnce sync.Once
	bltLib  *BLASLt
	bltErr  error
)

// LoadBLASLt loads libcublasLt (.13, .12 or .11) once per process; a missing library is an
// error wrapping ErrLibraryNotFound.
func LoadBLASLt() (*BLASLt, error) {
	bltOnce.Do(func() { bltLib, bltErr = loadBLASLt(cublasLtNames) })
	return bltLib, bltErr
}

func loadBLASLt(names []string) (*BLASLt, error) {
	lib, err := openLibrary(names)
	if err != nil {
		return nil, fmt.Errorf("loading cuBLASLt: %w", err)
	}
	b := &BLASLt{lib: lib}
	bn := binder{lib: lib}
	bn.bind(&b.cublasLtCreate, "cublasLtCreate")
	bn.bind(&b.cublasLtDestroy, "cublasLtDestroy")
	bn.bind(&b.cublasLtGetVersion, "cublasLtGetVersion")
	bn.bind(&b.cublasLtMatmulDescCreate, "cublasLtMatmulDescCreate")
	bn.bind(&b.cublasLtMatmulDescDestroy, "cublasLtMatmulDescDestroy")
	bn.bind(&b.cublasLtMatmulDescSetAttribute, "cublasLtMatmulDescSetAttribute")
	bn.bind(&b.cublasLtMatrixLayoutCreate, "cublasLtMatrixLayoutCreate")
	bn.bind(&b.cublasLtMatrixLayoutDestroy, "cublasLtMatrixLayoutDestroy")
	bn.bind(&b.cublasLtMatmulPreferenceCreate, "cublasLtMatmulPreferenceCreate")
	bn.bind(&b.cublasLtMatmulPreferenceDestroy, "cublasLtMatmulPreferenceDestroy")
	bn.bind(&b.cublasLtMatmulPreferenceSetAttribute, "cublasLtMatmulPreferenceSetAttribute")
	bn.bind(&b.cublasLtMatmulAlgoGetHeuristic, "cublasLtMatmulAlgoGetHeuristic")
	if bn.err != nil {
		return nil, fmt.Errorf("loading cuBLASLt: %w", bn.err)
	}
	if b.cublasLtMatmul, err = lib.symbol("cublasLtMatmul"); err != nil {
		return nil, fmt.Errorf("loading cuBLASLt: %w", err)
	}
	b.version = int(b.cublasLtGetVersion())
	return b, nil
}

// Version is the library's version (e.g. 130000 for 13.0.0).
func (b *BLASLt) Version() int { return b.version }

var cublasStatusNames = map[int32]string{
	1: "CUBLAS_STATUS_NOT_INITIALIZED", 3: "CUBLAS_STATUS_ALLOC_FAILED", 7: "CUBLAS_STATUS_INVALID_VALUE",
	8: "CUBLAS_STATUS_ARCH_MISMATCH", 11: "CUBLAS_STATUS_MAPPING_ERROR", 13: "CUBLAS_STATUS_EXECUTION_FAILED",
	14: "CUBLAS_STATUS_INTERNAL_ERROR", 15: "CUBLAS_STATUS_NOT_SUPPORTED", 16: "CUBLAS_STATUS_LICENSE_ERROR",
}

func cublasCheck(call string, res int32) error {
	if res == 0 {
		return nil
	}
	name, ok := cublasStatusNames[res]
	if !ok {
		name = fmt.Sprintf("cublasStatus(%d)", res)
	}
	return &Error{Call: call, Code: res, Name: name}
}

// cuBLASLt enumerations (cublasLt.h, library_types.h).
const (
	cudaR32F                = 0
	cudaR16BF               = 14
	cublasCompute32F        = 68
	cublasOpN               = 0
	cublasOpT               = 1
	ltDescTransA            = 3
	ltDescTransB            = 4
	ltPrefMaxWorkspaceBytes = 1
)

// ltHeuristic is cublasLtMatmulHeuristicResult_t: the algorithm (64 opaque bytes), its
// workspace, status, waves and reserved words: 96 bytes.
type ltHeuristic struct {
	algo          [8]uint64
	workspaceSize uintptr
	state         int32
	_             float32  // wavesCount
	_             [4]int32 // reserved
}

// ltLayout is a column-major matrix layout: rows, columns, leading dimension.
type ltLayout struct {
	Rows, Cols uint64
	LD         int64
}

// ltGemm is the column-major problem cuBLASLt solves for the row-major product
// out[n, N] = x[n, K] · w[N, K]ᵀ: outᵀ = op(A)·op(B) with A = w read as a K×N column-major
// matrix (transposed by op T), B = x read as K×n (op N), C = D = out read as N×n.
type ltGemm struct {
	TransA, TransB int32
	A, B, C        ltLayout
}

func gemmLayout(n, N, K, ldx, ldo int) ltGemm {
	return ltGemm{
		TransA: cublasOpT, TransB: cublasOpN,
		A: ltLayout{uint64(K), uint64(N), int64(K)},
		B: ltLayout{uint64(K), uint64(n), int64(ldx)},
		C: ltLayout{uint64(N), uint64(n), int64(ldo)},
	}
}

// LtHandle is a cuBLASLt handle (made in the current context; one per stream is usual).
type LtHandle struct {
	b *BLASLt
	h uintptr
}

// NewHandle creates a handle.
func (b *BLASLt) NewHandle() (*LtHandle, error) {
	var h uintptr
	if err := cublasCheck("cublasLtCreate", b.cublasLtCreate(&h)); err != nil {
		return nil, err
	}
	return &LtHandle{b: b, h: h}, nil
}

// Destroy releases the handle.
func (h *LtHandle) Destroy() error { return cublasCheck("cublasLtDestroy", h.b.cublasLtDestroy(h.h)) }

// Gemm is a planned bf16 product with f32 accumulation: out[n, N] = x[n, K] · w[N, K]ᵀ, x and w
// bf16, out f32 or bf16, row strides ldx and ldo. Plan once per shape (the heuristic query
// costs far more than a launch); Run may be captured in a graph.
type Gemm struct {
	h             *LtHandle
	desc          uintptr
	la, lb, lc    uintptr
	algo          ltHeuristic
	workspace     int
	shape         ltGemm
	n, bigN, bigK int
	alpha, beta   float32 // on the heap with the plan: Run passes their addresses
}

// NewGemm plans the product; workspace is the scratch bytes Run will be given (0 is valid;
// a few MiB lets the library choose faster algorithms).
func (h *LtHandle) NewGemm(n, N, K, ldx, ldo int, outBF16 bool, workspace int) (*Gemm, error) {
	if n < 1 || N < 1 || K < 1 || ldx < K || ldo < N {
		return nil, fmt.Errorf("gemm [%d, %d]·[%d, %d]ᵀ with strides %d, %d: %w", n, K, N, K, ldx, ldo, ErrLaunch)
	}
	b := h.b
	g := &Gemm{h: h, workspace: workspace, shape: gemmLayout(n, N, K, ldx, ldo), n: n, bigN: N, bigK: K, alpha: 1}
	fail := func(err error) (*Gemm, error) {
		g.Destroy()
		return nil, fmt.Errorf("planning gemm [%d, %d]·[%d, %d]ᵀ: %w", n, K, N, K, err)
	}
	if err := cublasCheck("cublasLtMatmulDescCreate", b.cublasLtMatmulDescCreate(&g.desc, cublasCompute32F, cudaR32F)); err != nil {
		return fail(err)
	}
	ta, tb := g.shape.TransA, g.shape.TransB
	if err := cublasCheck("cublasLtMatmulDescSetAttribute", b.cublasLtMatmulDescSetAttribute(g.desc, ltDescTransA, unsafe.Pointer(&ta), 4)); err != nil {
		return fail(err)
	}
	if err := cublasCheck("cublasLtMatmulDescSetAttribute", b.cublasLtMatmulDescSetAttribute(g.desc, ltDescTransB, unsafe.Pointer(&tb), 4)); err != nil {
		return fail(err)
	}
	outType := int32(cudaR32F)
	if outBF16 {
		outType = cudaR16BF
	}
	for _, l := range []struct {
		dst *uintptr
		typ int32
		lay ltLayout
	}{{&g.la, cudaR16BF, g.shape.A}, {&g.lb, cudaR16BF, g.shape.B}, {&g.lc, outType, g.shape.C}} {
		if err := cublasCheck("cublasLtMatrixLayoutCreate", b.cublasLtMatrixLayoutCreate(l.dst, l.typ, l.lay.Rows, l.lay.Cols, l.lay.LD)); err != nil {
			return fail(err)
		}
	}
	var pref uintptr
	if err := cublasCheck("cublasLtMatmulPreferenceCreate", b.cublasLtMatmulPreferenceCreate(&pref)); err != nil {
		return fail(err)
	}
	defer b.cublasLtMatmulPreferenceDestroy(pref)
	ws := uint64(workspace)
	if err := cublasCheck("cublasLtMatmulPreferenceSetAttribute", b.cublasLtMatmulPreferenceSetAttribute(pref, ltPrefMaxWorkspaceBytes, unsafe.Pointer(&ws), 8)); err != nil {
		return fail(err)
	}
	var found int32
	if err := cublasCheck("cublasLtMatmulAlgoGetHeuristic", b.cublasLtMatmulAlgoGetHeuristic(h.h, g.desc, g.la, g.lb, g.lc, g.lc, pref, 1, &g.algo, &found)); err != nil {
		return fail(err)
	}
	if found < 1 {
		return fail(fmt.Errorf("no cuBLASLt algorithm for this shape: %w", ErrLaunch))
	}
	if err := cublasCheck("cublasLtMatmulAlgoGetHeuristic (result)", g.algo.state); err != nil {
		return fail(err)
	}
	if int(g.algo.workspaceSize) > workspace {
		return fail(fmt.Errorf("the algorithm wants %d bytes of workspace, %d planned: %w", g.algo.workspaceSize, workspace, ErrLaunch))
	}
	return g, nil
}

// Run queues the product on s. out, x and w must match the planned shape; workspace holds
// the planned workspace bytes (or is 0 when planned with none).
func (g *Gemm) Run(s *Stream, out, x, w, workspace DevicePtr) error {
	b := g.h.b
	var pin runtime.Pinner
	pin.Pin(g)
	res := ccall(b.cublasLtMatmul, g.h.h, g.desc, uintptr(unsafe.Pointer(&g.alpha)),
		uintptr(w), g.la, uintptr(x), g.lb, uintptr(unsafe.Pointer(&g.beta)),
		uintptr(out), g.lc, uintptr(out), g.lc, uintptr(unsafe.Pointer(&g.algo.algo)),
		uintptr(workspace), uintptr(g.workspace), s.s)
	pin.Unpin()
	if err := cublasCheck("cublasLtMatmul", int32(res)); err != nil {
		return fmt.Errorf("gemm [%d, %d]·[%d, %d]ᵀ: %w", g.n, g.bigK, g.bigN, g.bigK, err)
	}
	return nil
}

// Destroy releases the plan's descriptors.
func (g *Gemm) Destroy() {
	b := g.h.b
	for _, l := range []uintptr{g.la, g.lb, g.lc} {
		if l != 0 {
			b.cublasLtMatrixLayoutDestroy(l)
		}
	}
	if g.desc != 0 {
		b.cublasLtMatmulDescDestroy(g.desc)
	}
	g.la, g.lb, g.lc, g.desc = 0, 0, 0, 0
}
