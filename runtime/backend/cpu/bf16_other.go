//go:build !amd64

package cpu

var haveBF16 = false

var dpTiles [6]func(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

var pairTiles [5]func(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

func sumSquaresAVX512(x *float32, n int) float64 { panic("cpu: no AVX-512 on this architecture") }

func scaleAVX512(out, x, w *float32, inv float32, n int, add bool) {
	panic("cpu: no AVX-512 on this architecture")
}

func dpTile8x1(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int) {
	panic("cpu: no AVX-512 on this architecture")
}

func pairTile8x1(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int) {
	panic("cpu: no AVX-512 on this architecture")
}

var dpNew, dpOld dpKernels

var pairNew, pairOld pairKernels
