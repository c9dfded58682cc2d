package cpu

import (
	"unsafe"

	"golang.org/x/sys/cpu"
)

// haveAVX2FMA gates the assembly tiles; without them the portable loops in cpu.go run.
var haveAVX2FMA = cpu.X86.HasAVX2 && cpu.X86.HasFMA

// Assembly tiles (matmul_amd64.s): 4 bf16 weight rows × 1, 2 or 3 float32 activation rows.
//
//go:noescape
func tile4x1(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32)

//go:noescape
func tile4x2(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32)

//go:noescape
func tile4x3(w *uint16, ldw int, x *float32, ldx int, k int, acc *float32)

// tile runs the m-row tile (1 ≤ m ≤ 3) on 4 weight rows starting at w[0] and m activation
// rows starting at x[0], each cols long, leaving lane sums in acc[:m*32].
func tile(m int, w []uint16, x []float32, cols int, acc *[96]float32) {
	wp, xp, ldw, ldx := unsafe.SliceData(w), unsafe.SliceData(x), 2*cols, 4*cols
	switch m {
	case 1:
		tile4x1(wp, ldw, xp, ldx, cols, &acc[0])
	case 2:
		tile4x2(wp, ldw, xp, ldx, cols, &acc[0])
	default:
		tile4x3(wp, ldw, xp, ldx, cols, &acc[0])
	}
}
