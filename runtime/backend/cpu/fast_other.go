//go:build !amd64

package cpu

// haveAVX2FMA is false off amd64: the portable loops in cpu.go run. (A variable, as on amd64,
// so benchmarks can switch the vector path off.)
var haveAVX2FMA = false

func tile(int, []uint16, []float32, int, *[96]float32) {}
