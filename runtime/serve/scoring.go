package serve

import (
	"math"
	"strings"

	"github.com/loopserve/loopserve/runtime/engine"
)

// scoring asks the engine request for the log-probabilities the job wants: each generated
// token's with its alternatives, and the prompt's for an echo job.
func scoring(r *engine.Request, job Job) {
	r.Logprobs = job.Logprobs
	r.TopLogprobs = min(job.TopLogprobs, engine.MaxTopLogprobs)
	r.PromptLogprobs = job.Logprobs && job.Echo
}

// logprobFloor stands for -Inf (JSON has none), as OpenAI reports impossible tokens.
const logprobFloor = -9999

// logprob turns an engine token's score into the client's shape, with the token's text and
// bytes and the depth of the exit step that scored it. generated is false for prompt tokens,
// whose first has no score (Depth 0).
func (w *Worker) logprob(t engine.Token, generated bool) Logprob {
	lp := w.tokenLogprob(t.ID, t.Logprob)
	lp.Depth = t.Depth
	if !generated && t.Depth == 0 {
		lp.None, lp.Logprob = true, 0
	}
	for _, alt := range t.Top {
		lp.Top = append(lp.Top, w.tokenLogprob(alt.ID, alt.Logprob))
	}
	return lp
}

func (w *Worker) tokenLogprob(id int, v float32) Logprob {
	b := w.tok.TokenBytes(id)
	if math.IsInf(float64(v), -1) || math.IsNaN(float64(v)) || v < logprobFloor {
		v = logprobFloor
	}
	return Logprob{Token: strings.ToValidUTF8(string(b), "\uFFFD"), Bytes: b, Logprob: v}
}
