package cpu

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/loopserve/loopserve/runtime/backend/host"
)

// TestExpfMatchesMathExp sweeps the float32 range where e^x is a normal float and checks expf
// against math.Exp in relative terms, plus the edges (underflow, overflow, NaN).
func TestExpfMatchesMathExp(t *testing.T) {
	const tol = 3e-7
	worst := 0.0
	for x := float32(-87.3); x < 88.7; x += 0.000731 * (1 + float32(math.Abs(float64(x)))) {
		want := math.Exp(float64(x))
		got := float64(expf(x))
		rel := math.Abs(got-want) / want
		worst = math.Max(worst, rel)
		if rel > tol {
			t.Fatalf("expf(%g) = %g, want %g (relative error %.3g > %g)", x, got, want, rel, tol)
		}
	}
	t.Logf("worst relative error %.3g", worst)
	for _, c := range []struct {
		x, want float32
	}{
		{0, 1},
		{-100, 0},
		{float32(math.Inf(-1)), 0},
		{89, float32(math.Inf(1))},
		{float32(math.Inf(1)), float32(math.Inf(1))},
	} {
		if got := expf(c.x); got != c.want {
			t.Errorf("expf(%g) = %g, want %g", c.x, got, c.want)
		}
	}
	if got := expf(float32(math.NaN())); got == got {
		t.Errorf("expf(NaN) = %g, want NaN", got)
	}
}

func TestExpShift(t *testing.T) {
	s := []float32{1, 2, 3, -50}
	want := make([]float64, len(s))
	var wantSum float64
	for i, v := range s {
		want[i] = math.Exp(float64(v - 3))
		wantSum += want[i]
	}
	sum := expShift(s, 3)
	for i := range s {
		if d := math.Abs(float64(s[i])-want[i]) / want[i]; d > 3e-7 {
			t.Errorf("expShift[%d] = %g, want %g", i, s[i], want[i])
		}
	}
	if d := math.Abs(float64(sum)-wantSum) / wantSum; d > 1e-6 {
		t.Errorf("expShift sum = %g, want %g", sum, wantSum)
	}
}

func BenchmarkExp(b *testing.B) {
	s := make([]float32, 1024)
	b.Run("expf", func(b *testing.B) {
		for b.Loop() {
			for i := range s {
				s[i] = -float32(i) / 64
			}
			expShift(s, 0)
		}
	})
	b.Run("math", func(b *testing.B) {
		for b.Loop() {
			for i := range s {
				s[i] = -float32(i) / 64
			}
			for i, v := range s {
				s[i] = float32(math.Exp(float64(v)))
			}
		}
	})
}

// TestExpShiftVector checks the vector path (and its scalar tail) against math.Exp at lengths
// around the 16-lane groups, over arguments from the underflow clamp to 0.
func TestExpShiftVector(t *testing.T) {
	for _, n := range []int{1, 15, 16, 17, 33, 100, 257} {
		s := make([]float32, n)
		for i := range s {
			s[i] = 5 - 95*float32(i)/float32(n)
		}
		want := make([]float64, n)
		var wantSum float64
		for i, v := range s {
			want[i] = math.Exp(float64(v - 5))
			wantSum += want[i]
		}
		sum := expShift(s, 5)
		for i := range s {
			if d := math.Abs(float64(s[i]) - want[i]); d > 3e-7*want[i] && d > 2e-38 {
				t.Errorf("n %d: expShift[%d] = %g, want %g", n, i, s[i], want[i])
			}
		}
		if d := math.Abs(float64(sum)-wantSum) / wantSum; d > 1e-6 {
			t.Errorf("n %d: expShift sum = %g, want %g", n, sum, wantSum)
		}
	}
}

// TestLaneSums16MatchesLaneSum: the vector reduction is bit-identical to laneSum, which the
// scalar paths and other machines use.
func TestLaneSums16MatchesLaneSum(t *testing.T) {
	if !haveAVX512 {
		t.Skip("no AVX-512")
	}
	// Single vectors, one transposed block, and blocks followed by single vectors.
	for _, n := range []int{1, 5, 16, 16*3 + 5} {
		src := make([]float32, 16*n)
		for i := range src {
			src[i] = float32(math.Sin(float64(i)*1.7)) * float32(1+i%5*1000)
		}
		got := make([]float32, n)
		laneSums16(&got[0], &src[0], n)
		for i := range n {
			if want := laneSum(src[16*i : 16*i+16]); math.Float32bits(got[i]) != math.Float32bits(want) {
				t.Errorf("n %d: laneSums16[%d] = %g, want %g (laneSum)", n, i, got[i], want)
			}
		}
	}
}

// TestAttentionPathsMatchReference runs float32 attention with the AVX-512 loops on and off
// against the oracle, at head widths that take them (16, 32) and one that does not (12).
func TestAttentionPathsMatchReference(t *testing.T) {
	saved := attnAVX512
	t.Cleanup(func() { attnAVX512 = saved })
	r := rand.New(rand.NewPCG(3, 4))
	be := New(0)
	defer be.Close()
	for _, vec := range []bool{false, saved} {
		attnAVX512 = vec
		for _, hd := range []int{16, 32, 12} {
			heads, kvHeads := 4, 2
			var jobs, refJobs []host.AttnJob
			for _, n := range []int{1, 2, 3, 16, 33, 128} {
				q := fastRandVec(r, heads*hd)
				k, v := fastRandVec(r, n*kvHeads*hd), fastRandVec(r, n*kvHeads*hd)
				// Paged as in a cache (runs of 16 positions), and the oracle on one run.
				jobs = append(jobs, host.AttnJob{Q: q, Runs: pages(k, v, n, kvHeads*hd), Out: make([]float32, heads*hd)})
				refJobs = append(refJobs, host.AttnJob{Q: q, Runs: host.Contiguous(k, v, n), Out: make([]float32, heads*hd)})
			}
			scale := float32(1 / math.Sqrt(float64(hd)))
			be.Attention(jobs, heads, kvHeads, hd, scale)
			Reference{}.Attention(refJobs, heads, kvHeads, hd, scale)
			for i := range jobs {
				for d, got := range jobs[i].Out {
					if want := refJobs[i].Out[d]; math.Abs(float64(got-want)) > 1e-5 {
						t.Errorf("vector %v hd %d n %d: out[%d] = %g, want %g", vec, hd, jobs[i].N(), d, got, want)
					}
				}
			}
		}
	}
}

// TestAttnScoresBlocks: the 16-position blocks give the same scores as positions taken one at
// a time (both sum in laneSum's order), near the float64 dot products, and the returned
// maximum is the largest score.
func TestAttnScoresBlocks(t *testing.T) {
	if !haveAVX512 {
		t.Skip("no AVX-512")
	}
	r := rand.New(rand.NewPCG(7, 8))
	for _, hd := range []int{16, 48} {
		for _, n := range []int{1, 15, 16, 17, 40} {
			const kvDim, off, scale = 96, 32, 0.25
			q := fastRandVec(r, hd)
			k := fastRandVec(r, n*kvDim)
			got := make([]float32, n)
			mx := attnScoresAVX512(&q[0], &k[off], 4*kvDim, n, hd, scale, &got[0])
			wantMax := float32(math.Inf(-1))
			for p := range n {
				var one [1]float32
				attnScoresAVX512(&q[0], &k[p*kvDim+off], 4*kvDim, 1, hd, scale, &one[0])
				if math.Float32bits(got[p]) != math.Float32bits(one[0]) {
					t.Errorf("hd %d n %d: score %d = %g in a block, %g alone", hd, n, p, got[p], one[0])
				}
				var want float64
				for d := range hd {
					want += float64(q[d]) * float64(k[p*kvDim+off+d])
				}
				if d := math.Abs(float64(got[p]) - scale*want); d > 1e-5 {
					t.Errorf("hd %d n %d: score %d = %g, want %g", hd, n, p, got[p], scale*want)
				}
				wantMax = max(wantMax, got[p])
			}
			if mx != wantMax {
				t.Errorf("hd %d n %d: max = %g, want %g", hd, n, mx, wantMax)
			}
		}
	}
}

// pages splits keys and values [n, kvDim] into runs of host.Block positions, as a cache holds them.
func pages(k, v []float32, n, kvDim int) []host.Run {
	var runs []host.Run
	for p := 0; p < n; p += host.Block {
		m := min(host.Block, n-p)
		runs = append(runs, host.Run{K: k[p*kvDim : (p+m)*kvDim], V: v[p*kvDim : (p+m)*kvDim], N: m})
	}
	return runs
}
