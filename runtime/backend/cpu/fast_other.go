//go:build !amd64

package cpu

// No vector path off amd64: the portable loops in cpu.go run. (Variables, as on amd64, so
// tests and benchmarks compile the same everywhere.)
var (
	haveAVX2FMA = false
	haveAVX512  = false
)

func pickTiles(int) (lanes, maxM int) { return 0, 0 }

func tile(int, int, []uint16, int, []float32, int, int, []float32, int, bool) {}
