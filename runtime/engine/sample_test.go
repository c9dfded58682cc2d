package engine

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestTopKMatchesSort checks the heap selection against a full sort, ties included.
func TestTopKMatchesSort(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for _, V := range []int{1, 5, 100, 1000} {
		logits := make([]float32, V)
		for i := range logits {
			logits[i] = float32(r.IntN(20)) // many ties
		}
		cmpf := func(a, b int) int {
			if c := cmpDesc(logits[a], logits[b]); c != 0 {
				return c
			}
			return a - b
		}
		all := make([]int, V)
		for i := range all {
			all[i] = i
		}
		slices.SortFunc(all, cmpf)
		for _, k := range []int{1, 3, V} {
			if k > V {
				continue
			}
			if diff := cmp.Diff(topK(nil, logits, k, cmpf), all[:k]); diff != "" {
				t.Errorf("V=%d k=%d (-heap +sort):\n%s", V, k, diff)
			}
		}
	}
}

// TestSamplingDistribution draws many tokens and compares frequencies with the filtered softmax.
func TestSamplingDistribution(t *testing.T) {
	logits := []float32{2, 1, 0.5, 0, -1, -3}
	for _, tc := range []struct {
		s    Sampling
		want []float64
	}{
		{Sampling{Temperature: 1}, softmax(logits, 1, 6)},
		{Sampling{Temperature: 0.5, TopK: 2}, softmax(logits, 0.5, 2)},
		// top-p 0.7 at T=1: p = .561, .206, .125, ...: the first two hold .767 ≥ 0.7.
		{Sampling{Temperature: 1, TopP: 0.7}, softmax(logits, 1, 2)},
		{Sampling{Temperature: 1, TopP: 0.8}, softmax(logits, 1, 3)},
	} {
		sm := &sampler{s: tc.s, rng: rand.New(rand.NewPCG(1, 2))}
		counts := make([]float64, len(logits))
		const n = 40000
		for i := 0; i < n; i++ {
			counts[sm.pick(logits)]++
		}
		for i := range counts {
			if got := counts[i] / n; math.Abs(got-tc.want[i]) > 0.015 {
				t.Errorf("%+v: token %d frequency %.3f, want %.3f", tc.s, i, got, tc.want[i])
			}
		}
	}
}

// softmax of the first k logits (already sorted descending) at temperature T, zero elsewhere.
func softmax(logits []float32, T float64, k int) []float64 {
	out := make([]float64, len(logits))
	var sum float64
	for i := 0; i < k; i++ {
		out[i] = math.Exp(float64(logits[i]) / T)
		sum += out[i]
	}
	for i := 0; i < k; i++ {
		out[i] /= sum
	}
	return out
}
