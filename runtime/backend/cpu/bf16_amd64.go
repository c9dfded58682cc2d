package cpu

import "golang.org/x/sys/cpu"

// haveBF16 reports AVX-512 BF16 (VDPBF16PS), which the BF16 numerics need.
var haveBF16 = cpu.X86.HasAVX512BF16 && cpu.X86.HasAVX512F

// Assembly tiles of matmulbf16_amd64.s: 4 bf16 weight rows × m bf16 activation rows, summed
// into out.
//
//go:noescape
func dpTile4x1(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTile4x2(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTile4x3(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTile4x4(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTile4x5(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTile4x6(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

var dpTiles = [...]func(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int){
	dpTile4x1, dpTile4x2, dpTile4x3, dpTile4x4, dpTile4x5, dpTile4x6}

// Assembly tiles of matmulpair_amd64.s: 4 bf16 weight rows × m float32 activation rows
// (permuted by permutePairs), summed into out.
//
//go:noescape
func pairTile4x1(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTile4x2(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTile4x3(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTile4x4(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTile4x5(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

var pairTiles = [...]func(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int){
	pairTile4x1, pairTile4x2, pairTile4x3, pairTile4x4, pairTile4x5}

//go:noescape
func sumSquaresAVX512(x *float32, n int) float64

//go:noescape
func scaleAVX512(out, x, w *float32, inv float32, n int, add bool)

//go:noescape
func dpTile8x1(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTile8x1(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

// The prefetching variants of the tiles above (the P tiles of matmulbf16_amd64.s and
// matmulpair_amd64.s): the same sums, with each chunk also prefetching the same chunk of the
// next tile's weight rows (the 4-row tiles, into L1) or of the tile after it (the 8-row ones,
// for one activation row, into L2: a stream that far ahead keeps more lines in flight).
//
//go:noescape
func dpTileP8x1(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTileP8x1(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTileP4x1(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTileP4x2(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTileP4x3(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTileP4x4(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTileP4x5(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func dpTileP4x6(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTileP4x1(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTileP4x2(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTileP4x3(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTileP4x4(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

//go:noescape
func pairTileP4x5(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)

// The kernel sets the products use: the prefetching tiles walked weight tile by weight tile
// for small batches and for one row, the plain ones in row blocks otherwise (dpNew, pairNew),
// and the former sets (plain tiles, row blocks at every batch size) that the benchmarks
// compare against.
var (
	dpNew = dpKernels{
		tiles:   [...]dpTileFunc{dpTileP4x1, dpTileP4x2, dpTileP4x3, dpTileP4x4, dpTileP4x5, dpTileP4x6},
		blocked: dpTiles, wide: dpTileP8x1, small: smallBatch,
	}
	dpOld   = dpKernels{tiles: dpTiles, blocked: dpTiles, wide: dpTile8x1}
	pairNew = pairKernels{
		tiles:   [...]pairTileFunc{pairTileP4x1, pairTileP4x2, pairTileP4x3, pairTileP4x4, pairTileP4x5},
		blocked: pairTiles, wide: pairTileP8x1, small: smallBatch,
	}
	pairOld = pairKernels{tiles: pairTiles, blocked: pairTiles, wide: pairTile8x1}
)
