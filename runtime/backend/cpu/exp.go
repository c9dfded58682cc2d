package cpu

import "math"

// expf is e^x in float32 for the softmax and SiLU kernels, about 3× cheaper than math.Exp's
// float64 round trip: Cody-Waite reduction x = n·ln2 + r with |r| ≤ ln2/2, a degree-6 minimax
// polynomial for e^r (Cephes expf), and 2^n built in the exponent bits. The relative error
// stays under 3e-7 (a few float32 ulps, see TestExpfMatchesMathExp). Results below
// e^-87.3 (subnormal) flush to 0, above e^88.7 they are +Inf; NaN stays NaN.
//
//go:norace
func expf(x float32) float32 {
	const (
		log2e = 1.44269504088896341
		ln2hi = 0.693359375
		ln2lo = -2.12194440e-4
		lo    = -87.33654475 // ln(2^-126): smallest normal result
		hi    = 88.72283905  // ln(MaxFloat32)
	)
	switch {
	case x < lo:
		return 0
	case x > hi:
		return float32(math.Inf(1))
	case x != x:
		return x
	}
	n := float32(math.Floor(float64(x*log2e + 0.5)))
	r := x - n*ln2hi
	r -= n * ln2lo
	p := float32(1.9875691500e-4)
	p = p*r + 1.3981999507e-3
	p = p*r + 8.3334519073e-3
	p = p*r + 4.1665795894e-2
	p = p*r + 1.6666665459e-1
	p = p*r + 5.0000001201e-1
	p = p*r*r + r + 1
	// n ∈ [-126, 128]: split 2^n in two factors so n = 128 (x just under hi) does not
	// overflow the exponent field.
	ni := int32(n)
	h := ni / 2
	return p * math.Float32frombits(uint32(h+127)<<23) * math.Float32frombits(uint32(ni-h+127)<<23)
}

// expShift replaces each s[i] by e^(s[i]-mx) and returns their sum (the softmax numerators
// and denominator). With AVX-512 whole groups of 16 take the vector path (the same
// polynomial; results under e^-87.3 are ~1e-38 instead of 0) and the rest expf.
//
//go:norace
func expShift(s []float32, mx float32) float32 {
	var sum float32
	if n := len(s) &^ 15; haveAVX512 && n > 0 {
		sum = expShiftAVX512(&s[0], n, mx)
		s = s[n:]
	}
	for i, v := range s {
		e := expf(v - mx)
		s[i] = e
		sum += e
	}
	return sum
}
