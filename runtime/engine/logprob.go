package engine

// scoreToken fills tok.Logprob (and tok.Top with top > 0) from the raw logits [vocab] that
// scored it: log-softmax, before any sampling transform.
func scoreToken(tok *Token, logits []float32, top int) {
	lse := LogSumExp(logits)
	tok.Logprob = float32(float64(logits[tok.ID]) - lse)
	if top > 0 {
		tok.Top = TopLogprobs(make([]Logprob, 0, top), logits, top, lse)
	}
}
