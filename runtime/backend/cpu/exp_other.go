//go:build !amd64

package cpu

func expShiftAVX512(s *float32, n int, mx float32) float32 {
	panic("cpu: no AVX-512 on this architecture")
}

func laneSums16(dst *float32, src *float32, n int) { panic("cpu: no AVX-512 on this architecture") }
