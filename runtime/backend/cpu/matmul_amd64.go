package cpu

//go:generate go run fast_gen.go

import (
	"unsafe"

	"golang.org/x/sys/cpu"
)

// The vector paths: AVX-512 (16 lanes, tiles of up to 6 activation rows) where the CPU and OS
// support it, else AVX2 with FMA (8 lanes, up to 3 rows); without either the portable loops in
// cpu.go run. Variables so that tests and benchmarks can switch a path off.
var (
	haveAVX2FMA = cpu.X86.HasAVX2 && cpu.X86.HasFMA
	haveAVX512  = cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW
)

// Assembly tiles: 4 bf16 weight rows × m float32 activation rows (matmul_amd64.s,
// matmul512_amd64.s).
//
//go:noescape
func tile4x1(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool)

//go:noescape
func tile4x2(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool)

//go:noescape
func tile4x3(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool)

//go:noescape
func tile512x4x1(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool)

//go:noescape
func tile512x4x2(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool)

//go:noescape
func tile512x4x3(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool)

//go:noescape
func tile512x4x4(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool)

//go:noescape
func tile512x4x5(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool)

//go:noescape
func tile512x4x6(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool)

var (
	tiles256 = [...]func(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool){tile4x1, tile4x2, tile4x3}
	tiles512 = [...]func(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32, ldacc int, zero bool){
		tile512x4x1, tile512x4x2, tile512x4x3, tile512x4x4, tile512x4x5, tile512x4x6}
)

// pickTiles returns the tile family for rows of cols columns: its lanes and the most
// activation rows per tile, or lanes 0 when no vector path applies.
func pickTiles(cols int) (lanes, maxM int) {
	switch {
	case haveAVX512 && cols%16 == 0:
		return 16, len(tiles512)
	case haveAVX2FMA && cols%8 == 0:
		return 8, len(tiles256)
	}
	return 0, 0
}

// tile runs the family of the given lanes with m activation rows (1 ≤ m ≤ maxM) on 4 weight
// rows starting at w[0] (stride ldw elements) and m activation rows starting at x[0] (stride
// ldx), over k columns, accumulating into the lane vectors at acc[i*ldacc + j*lanes], which
// start at zero when zero is set.
func tile(lanes, m int, w []uint16, ldw int, x []float32, ldx, k int, acc []float32, ldacc int, zero bool) {
	wp, xp := unsafe.SliceData(w), unsafe.SliceData(x)
	if lanes == 16 {
		tiles512[m-1](wp, 2*ldw, xp, 4*ldx, k, &acc[0], 4*ldacc, zero)
		return
	}
	tiles256[m-1](wp, 2*ldw, xp, 4*ldx, k, &acc[0], 4*ldacc, zero)
}
