package cudakern

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/loopserve/loopserve/runtime/model"
)

// The device's bf16 helpers (kernels/common.cuh) transliterated to Go, operation for
// operation. This checks the algorithm against the host's conversions on the CPU; the device
// code itself runs only in the GPU tests.
func deviceF32ToBF16(f float32) uint16 {
	u := math.Float32bits(f)
	if u&0x7fffffff > 0x7f800000 {
		return uint16((u >> 16) | 0x40)
	}
	u += 0x7fff + ((u >> 16) & 1)
	return uint16(u >> 16)
}

func deviceBF16ToF32(b uint16) float32 { return math.Float32frombits(uint32(b) << 16) }

// deviceUnpack is load8's unpacking of one 32-bit word: the lower address (the lower half on
// a little-endian device) is the first element.
func deviceUnpack(w uint32) (lo, hi float32) {
	return math.Float32frombits(w << 16), math.Float32frombits(w & 0xffff0000)
}

func TestBF16Helpers(t *testing.T) {
	special := []float32{0, float32(math.Copysign(0, -1)), 1, -1, 1.00390625, 1.0078125, 1.01171875,
		math.MaxFloat32, -math.MaxFloat32, math.SmallestNonzeroFloat32, 1e-40,
		float32(math.Inf(1)), float32(math.Inf(-1)), 65504, 3.14159265}
	check := func(f float32) {
		got, want := deviceF32ToBF16(f), model.F32ToBF16(f)
		if got != want {
			t.Fatalf("f32_to_bf16(%v = %#08x) = %#04x, host %#04x", f, math.Float32bits(f), got, want)
		}
		if math.IsNaN(float64(f)) {
			if !math.IsNaN(float64(deviceBF16ToF32(got))) {
				t.Fatalf("NaN %#08x narrowed to non-NaN %#04x", math.Float32bits(f), got)
			}
			return
		}
		if w := deviceBF16ToF32(got); w != model.BF16ToF32(got) {
			t.Fatalf("bf16_to_f32(%#04x) = %v", got, w)
		}
	}
	for _, f := range special {
		check(f)
	}
	for _, bits := range []uint32{0x7fc00000, 0x7f800001, 0xffffffff, 0x7fbfffff} { // NaNs, quiet and signalling
		check(math.Float32frombits(bits))
	}
	// Every rounding boundary of a few exponents, and random patterns.
	for _, hi := range []uint32{0x3f80, 0x0001, 0x7f7f, 0xbf80} {
		for lo := uint32(0x7ffe); lo <= 0x8002; lo++ {
			check(math.Float32frombits(hi<<16 | lo))
		}
	}
	rng := rand.New(rand.NewPCG(5, 6))
	for range 1 << 20 {
		check(math.Float32frombits(rng.Uint32()))
	}
	lo, hi := deviceUnpack(uint32(model.F32ToBF16(-2))<<16 | uint32(model.F32ToBF16(0.5)))
	if lo != 0.5 || hi != -2 {
		t.Errorf("unpack = %v, %v; want 0.5 (lower address), -2", lo, hi)
	}
}
