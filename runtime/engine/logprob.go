package engine

import "math"

// logSumExp is log Σ exp(logits[i]), in float64 around the maximum so no term overflows.
func logSumExp(logits []float32) float64 {
	mx := float64(logits[argmax(logits)])
	if math.IsInf(mx, 0) || math.IsNaN(mx) {
		return mx
	}
	var s float64
	for _, v := range logits {
		s += math.Exp(float64(v) - mx)
	}
	return mx + math.Log(s)
}

// scoreToken fills tok.Logprob (and tok.Top with top > 0) from the raw logits [vocab] that
// scored it: log-softmax, before any sampling transform.
func scoreToken(tok *Token, logits []float32, top int) {
	lse := logSumExp(logits)
	tok.Logprob = float32(float64(logits[tok.ID]) - lse)
	if top <= 0 {
		return
	}
	ids := topK(make([]int, 0, top), logits, min(top, len(logits)), func(a, b int) int {
		if c := cmpDesc(logits[a], logits[b]); c != 0 {
			return c
		}
		return a - b
	})
	tok.Top = make([]Logprob, len(ids))
	for i, id := range ids {
		tok.Top[i] = Logprob{ID: id, Logprob: float32(float64(logits[id]) - lse)}
	}
}
