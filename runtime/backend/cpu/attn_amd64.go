package cpu

import "golang.org/x/sys/cpu"

// attnAVX2 selects the vector attention loops for head widths that are multiples of 16.
var attnAVX2 = cpu.X86.HasAVX2 && cpu.X86.HasFMA

// attnAVX512 selects the all-assembly attention loops (float32 keys and values, head widths
// that are multiples of 16); a variable so tests can compare both paths.
var attnAVX512 = cpu.X86.HasAVX512F

//go:noescape
func dotF32AVX2(a, b *float32, n int) float32

//go:noescape
func axpyF32AVX2(y *float32, a float32, x *float32, n int)

//go:noescape
func dotBF16F32AVX2(k *uint16, q *float32, n int) float32

//go:noescape
func axpyBF16AVX2(y *float32, a float32, x *uint16, n int)
