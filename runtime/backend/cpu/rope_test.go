package cpu

import (
	"math"
	"math/rand/v2"
	"testing"
)

// TestRoPETableMatchesDirect: rows rotated through the cached table are bit-identical to
// ropeRow's direct Sincos, while the table grows, for positions past ropeCap (direct), and
// for a second set of frequencies (rebuilt).
func TestRoPETableMatchesDirect(t *testing.T) {
	const heads, hd = 3, 16
	r := rand.New(rand.NewPCG(9, 10))
	be := New(2)
	defer be.Close()
	for _, tc := range []struct {
		theta float64
		pos   []int
	}{
		{10000, []int{0, 1, 2, 3}},
		{10000, []int{4, 5, 6, 7, 8, 9, 10, 50}},    // grows
		{10000, []int{3, 2, 1}},                     // cached
		{10000, []int{ropeCap - 1, ropeCap, 70000}}, // past the table: direct
		{500, []int{7, 0, 9}},                       // other frequencies
	} {
		inv := make([]float32, hd/2)
		for i := range inv {
			inv[i] = float32(1 / math.Pow(tc.theta, float64(2*i)/float64(hd)))
		}
		n := len(tc.pos)
		x := fastRandVec(r, n*heads*hd)
		want := append([]float32(nil), x...)
		for i, p := range tc.pos {
			ropeRow(want[i*heads*hd:(i+1)*heads*hd], heads, hd, p, inv)
		}
		be.RoPE(x, n, heads, hd, tc.pos, inv)
		for i := range x {
			if math.Float32bits(x[i]) != math.Float32bits(want[i]) {
				t.Fatalf("theta %g pos %v: x[%d] = %g, direct %g", tc.theta, tc.pos, i, x[i], want[i])
			}
		}
	}
}
