package engine

import (
	"hash/fnv"
	"math"
	"math/rand/v2"
	"slices"
)

// sampler picks tokens for one request. Its random stream depends only on the request's seed
// and the number of tokens drawn, so batching never changes a request's output.
type sampler struct {
	s     Sampling
	rng   *rand.Rand
	idx   []int     // [vocab] scratch
	probs []float64 // [vocab] scratch
}

// requestSeed is Sampling.Seed, or a hash of the request id when that is 0.
func requestSeed(r Request) uint64 {
	if r.Sampling.Seed != 0 {
		return r.Sampling.Seed
	}
	h := fnv.New64a()
	h.Write([]byte(r.ID))
	return h.Sum64()
}

func newSampler(r Request) *sampler {
	seed := requestSeed(r)
	return &sampler{s: r.Sampling, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// argmax returns the first index of the largest logit.
func argmax(logits []float32) int {
	best := 0
	for i, v := range logits {
		if v > logits[best] {
			best = i
		}
	}
	return best
}

// pick chooses a token from logits [vocab].
func (s *sampler) pick(logits []float32) int {
	if s.s.Temperature <= 0 {
		return argmax(logits)
	}
	V := len(logits)
	if cap(s.idx) < V {
		s.idx = make([]int, V)
		s.probs = make([]float64, V)
	}
	idx, probs := s.idx[:V], s.probs[:V]
	for i := range idx {
		idx[i] = i
	}
	cand := idx
	if k := s.s.TopK; k > 0 && k < V {
		// Partial order suffices: the k best, then sorted for top-p and a stable draw order.
		slices.SortStableFunc(cand, func(a, b int) int { return cmpDesc(logits[a], logits[b]) })
		cand = cand[:k]
	} else if s.s.TopP > 0 && s.s.TopP < 1 {
		slices.SortStableFunc(cand, func(a, b int) int { return cmpDesc(logits[a], logits[b]) })
	}
	mx := math.Inf(-1)
	for _, i := range cand {
		mx = math.Max(mx, float64(logits[i]))
	}
	var sum float64
	for j, i := range cand {
		p := math.Exp((float64(logits[i]) - mx) / s.s.Temperature)
		probs[j] = p
		sum += p
	}
	n := len(cand)
	if p := s.s.TopP; p > 0 && p < 1 {
		var acc float64
		for j := 0; j < len(cand); j++ {
			acc += probs[j] / sum
			if acc >= p {
				n = j + 1
				break
			}
		}
		sum = 0
		for j := 0; j < n; j++ {
			sum += probs[j]
		}
	}
	u := s.rng.Float64() * sum
	for j := 0; j < n; j++ {
		u -= probs[j]
		if u < 0 {
			return cand[j]
		}
	}
	return cand[n-1]
}

func cmpDesc(a, b float32) int {
	switch {
	case a > b:
		return -1
	case a < b:
		return 1
	}
	return 0
}

// probeHit decides deterministically whether token i of a request is a probe.
func probeHit(seed uint64, i int, fraction float64) bool {
	if fraction <= 0 {
		return false
	}
	if fraction >= 1 {
		return true
	}
	x := seed ^ (uint64(i)+1)*0x9e3779b97f4a7c15
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return float64(x>>11)/(1<<53) < fraction
}
