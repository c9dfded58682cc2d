package cpu

//go:noescape
func expShiftAVX512(s *float32, n int, mx float32) float32

//go:noescape
func laneSums16(dst *float32, src *float32, n int)
