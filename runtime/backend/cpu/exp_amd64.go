package cpu

//go:noescape
func expShiftAVX512(s *float32, n int, mx float32) float32

//go:noescape
func laneSums16(dst *float32, src *float32, n int)

//go:noescape
func attnScoresAVX512(q *float32, k *float32, stride int, n int, hd int, scale float32, out *float32) float32

//go:noescape
func attnMixAVX512(out *float32, w *float32, inv float32, v *float32, stride int, n int, hd int, add bool)
