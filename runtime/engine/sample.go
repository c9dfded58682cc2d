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

// pick chooses a token from logits [vocab]: softmax at the temperature over the top-k, then
// the smallest prefix (by probability) holding top-p of the mass, one uniform draw. Ties are
// ordered by id, so the draw is a pure function of logits and the random stream.
func (s *sampler) pick(logits []float32) int {
	if s.s.Temperature <= 0 {
		return argmax(logits)
	}
	V := len(logits)
	if cap(s.idx) < V {
		s.idx = make([]int, V)
		s.probs = make([]float64, V)
	}
	T := s.s.Temperature
	mx := float64(logits[argmax(logits)])
	byLogit := func(a, b int) int {
		if c := cmpDesc(logits[a], logits[b]); c != 0 {
			return c
		}
		return a - b
	}
	cand := s.idx[:0]
	topP := s.s.TopP > 0 && s.s.TopP < 1
	switch k := s.s.TopK; {
	case k > 0 && k < V:
		cand = topK(cand, logits, k, byLogit)
	case topP:
		// The nucleus lies among the tokens within a factor 1e-9 of the best whenever they
		// hold top-p of the mass; sort only those, else everything.
		var total, near float64
		cut := mx + T*math.Log(1e-9)
		for i, v := range logits {
			p := math.Exp((float64(v) - mx) / T)
			total += p
			if float64(v) >= cut {
				near += p
				cand = append(cand, i)
			}
		}
		if near < s.s.TopP*total {
			cand = cand[:0]
			for i := range logits {
				cand = append(cand, i)
			}
		}
		slices.SortFunc(cand, byLogit)
	default:
		for i := range logits {
			cand = append(cand, i)
		}
	}
	probs := s.probs[:len(cand)]
	var sum float64
	for j, i := range cand {
		probs[j] = math.Exp((float64(logits[i]) - mx) / T)
		sum += probs[j]
	}
	n := len(cand)
	if topP {
		var acc float64
		for j := range cand {
			acc += probs[j]
			if acc >= s.s.TopP*sum {
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

// topK appends the k best ids (by cmp, best first) to dst, keeping a min-heap of size k.
func topK(dst []int, logits []float32, k int, cmp func(a, b int) int) []int {
	h := dst[:0]
	// worse(a, b): a ranks after b.
	worse := func(a, b int) bool { return cmp(a, b) > 0 }
	down := func(i int) {
		for {
			l := 2*i + 1
			if l >= len(h) {
				return
			}
			w := l
			if r := l + 1; r < len(h) && worse(h[r], h[l]) {
				w = r
			}
			if !worse(h[w], h[i]) {
				return
			}
			h[i], h[w] = h[w], h[i]
			i = w
		}
	}
	for i := range logits {
		if len(h) < k {
			h = append(h, i)
			for c := len(h) - 1; c > 0; {
				p := (c - 1) / 2
				if !worse(h[c], h[p]) {
					break
				}
				h[c], h[p] = h[p], h[c]
				c = p
			}
			continue
		}
		if worse(h[0], i) {
			h[0] = i
			down(0)
		}
	}
	slices.SortFunc(h, cmp)
	return h
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
