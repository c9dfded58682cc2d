// Package cudakern is loopserve's CUDA layer: the kernels of a LoopLM loop step, written as
// CUDA C++ sources (kernels/*.cu, embedded) that NVRTC compiles at start-up for the device's
// architecture, and thin bindings to the three libraries it needs — the driver API
// (libcuda.so.1), NVRTC (libnvrtc.so.13|12|11.2) and cuBLASLt (libcublasLt.so.13|12|11) —
// through purego's dlopen: no cgo, so everything builds with CGO_ENABLED=0 and is vetted and
// tested on machines without a GPU. It knows nothing of the engine; runtime/backend/cuda
// composes it into the engine's backend.
//
// # Libraries
//
// Each library is looked for by soname, newest first, folder by folder: every entry of
// LD_LIBRARY_PATH, $CUDA_HOME/targets/x86_64-linux/lib and $CUDA_HOME/lib64, then
// /usr/local/cuda/targets/x86_64-linux/lib, /usr/local/cuda/lib64, /usr/local/nvidia/lib64,
// /usr/lib/x86_64-linux-gnu and /usr/lib64, and last the loader's own search. A library found
// nowhere is an error wrapping ErrLibraryNotFound that names it and the folders searched.
// LoadDriver, LoadNVRTC and LoadBLASLt load once per process; libraries are never unloaded.
//
// # Kernels
//
// The kernels include no CUDA toolkit header (bf16 is the upper half of an IEEE float32 and
// kernels/common.cuh carries the few helpers), so NVRTC needs no include path and CI compiles
// every kernel with Debian's libnvrtc11.2. A Spec fixes what is compiled in: the head width,
// the KV page size, and the numeric modes (GEMM inputs and KV cache in bf16 or f32).
// Build compiles the units for a Target (Target picks a cubin for the device's sm_XY, or PTX
// for a device newer than NVRTC) through a Cache keyed by source, headers, options, target
// and NVRTC version. LoadKernels loads the images into the current context; a Planner shapes
// each launch (grid, block, shared memory, arguments in the kernel's parameter order, shape
// checks) without touching the driver, and Kernels.Run checks the launch against the
// kernel's recorded signature before queueing it. The tests compile every unit for sm_80 and
// sm_90 and compare the recorded signatures with the compiled PTX.
//
// A loop step of n rows (row-major buffers, f32 unless named; act is the Spec's GEMM input
// type) composes them as:
//
//	embed                         token ids → h [n, hidden]                (the first step only)
//	rmsnorm                       x = input_layernorm(h)                   (act)
//	for each layer:
//	  matmul_rows | Gemm          qkv = x · [Wq; Wk; Wv]ᵀ                  (one fused weight)
//	  rope_kv                     rotate q in place, write rotated k and v into the row's cache
//	  attn_prefill | attn_decode+attn_combine   a = attention(q, cache)   (act)
//	  matmul_rows | Gemm          o = a · Woᵀ
//	  residual_norm               h += input_layernorm_2(o); x = post_attention_layernorm(h)
//	  matmul_rows | Gemm          gu = x · [Wgate; Wup]ᵀ
//	  swiglu                      m = silu(g) · u                          (act)
//	  matmul_rows | Gemm          o = m · Wdownᵀ
//	  residual_norm               h += post_attention_layernorm_2(o); x = next input_layernorm(h)
//	                              (last layer: h = norm(h), the gate logit, and layer 0's norm)
//	exit_decide                   the Q-exit decision per row, state kept on the device
//	matmul_rows | Gemm, topk      LM head logits, argmax / top-k / log-sum-exp of the rows that need them
//	gather_rows, scatter_rows     depth compaction: rows still running the next step
//	kv_copy                       the full KV policy's fill of later steps' caches
//
// # Numerics and batch invariance
//
// Weights are bf16, accumulation is f32 everywhere. Norms, RoPE, attention, SwiGLU, exit and
// top-k work on each row alone, and matmul_rows sums each output in a fixed order whatever the
// batch, and attn_decode splits the cache in DecodeChunk positions whatever the batch, so a
// row's result never depends on the rows beside it. cuBLASLt's products may (the library
// picks algorithms by shape): the batch-invariant check mode uses matmul_rows only.
//
// # KV cache
//
// Keys and values live in two pools [pages, KVPage, kvHeads·headDim] of the Spec's KV type.
// A cache (one sequence, one loop-step slot, one layer) is a list of page numbers in an int32
// page table; CacheLayout places the lists so that a row passes one offset (its cache for
// layer 0) and each layer's launches add a constant. Under the full KV policy a sequence has a
// slot per loop step, under the last policy one; the kernels are the same.
//
// # Ownership
//
// cudakern allocates no device memory behind its callers' backs: every buffer a kernel reads
// or writes is the caller's (allocated with Driver.Alloc, freed with Driver.Free), and the
// caller keeps it alive until the work using it is done. Asynchronous copies take only
// Pinned host memory. Kernels owns its modules (Unload), a Gemm its descriptors (Destroy).
// Driver, NVRTC and BLASLt are safe for concurrent use; a context is current per OS thread,
// so each goroutine issuing CUDA work runs under Context.Bind.
package cudakern
