//go:build !amd64

package cpu

var attnAVX2 = false

var attnAVX512 = false

func dotF32AVX2(a, b *float32, n int) float32 { panic("cpu: no AVX2 on this architecture") }

func axpyF32AVX2(y *float32, a float32, x *float32, n int) {
	panic("cpu: no AVX2 on this architecture")
}

func dotBF16F32AVX2(k *uint16, q *float32, n int) float32 { panic("cpu: no AVX2 on this architecture") }

func axpyBF16AVX2(y *float32, a float32, x *uint16, n int) {
	panic("cpu: no AVX2 on this architecture")
}
