package serve

import (
	"errors"

	"github.com/loopserve/loopserve/runtime/engine"
)

// errNoScores reports a job asking for log-probabilities from an engine that has none.
var errNoScores = errors.New("log-probabilities are not available from this engine")

// scoring asks the engine request for the log-probabilities the job wants.
func scoring(_ *engine.Request, job Job, _ int) error {
	if job.Logprobs {
		return errNoScores
	}
	return nil
}

type scored struct {
	id      int
	logprob float32
}

// tokenLogprob is the log-probability the engine reported for t.
func tokenLogprob(engine.Token) float32 { return 0 }

// tokenTop is the alternatives the engine reported at t's position.
func tokenTop(engine.Token) []scored { return nil }

// promptScores is the prompt tokens' scores carried by the first token's event.
func promptScores(engine.Event) []engine.Token { return nil }
