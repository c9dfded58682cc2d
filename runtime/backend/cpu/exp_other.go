//go:build !amd64

package cpu

func expShiftAVX512(s *float32, n int, mx float32) float32 {
	panic("cpu: no AVX-512 on this architecture")
}

func laneSums16(dst *float32, src *float32, n int) { panic("cpu: no AVX-512 on this architecture") }

func attnScoresAVX512(q *float32, k *float32, stride int, n int, hd int, scale float32, out *float32) float32 {
	panic("cpu: no AVX-512 on this architecture")
}

func attnMixAVX512(out *float32, w *float32, inv float32, v *float32, stride int, n int, hd int, add bool) {
	panic("cpu: no AVX-512 on this architecture")
}
