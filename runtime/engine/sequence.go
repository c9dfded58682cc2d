package engine

import (
	"context"
	"strings"
	"sync"
	"time"
)

// sequence is one request in flight: its cache, the tokens so far and where it stands.
// Only the goroutine iterating it touches its fields; events leave through out.
type sequence struct {
	e      *Engine
	ctx    context.Context
	req    Request
	out    *mailbox
	direct func(Token) bool // Generate's callback instead of out

	kv         *kvCache
	tokens     []int // prompt, then accepted generated tokens; the last one is not yet in kv
	prefilled  bool
	prefillPos int // prompt positions already prefilled (chunked prefill)
	generated  int
	smp        *sampler
	seed       uint64
	stops      map[int]bool
	maxStop    int // longest stop string in bytes

	prompt       []Token // PromptLogprobs: the prompt's scores so far, sent with the first token
	unit         unit    // the rows in flight
	drafts       []int   // speculative drafts awaiting verification
	draftSteps   int     // loop steps spent drafting since the last verification
	done         bool
	finishReason string
	err          error
}

func (e *Engine) newSequence(ctx context.Context, r Request) *sequence {
	c := e.m.Config
	s := &sequence{e: e, ctx: ctx, req: r, out: newMailbox(), smp: newSampler(r), seed: requestSeed(r),
		kv: newKVCache(e.opts.KVPolicy, c.TotalUTSteps, c.NumHiddenLayers, c.KVDim(), e.opts.KVBF16), stops: map[int]bool{}}
	s.tokens = append(make([]int, 0, len(r.Prompt)+min(r.MaxTokens, 4096)), r.Prompt...)
	s.kv.budget = e.kvBudget
	for _, id := range r.StopTokens {
		s.stops[id] = true
	}
	if e.eos >= 0 && !r.IgnoreEOS {
		s.stops[e.eos] = true
	}
	for _, str := range r.StopStrings {
		s.maxStop = max(s.maxStop, len(str))
	}
	return s
}

// finish ends the sequence once, with a reason or an error.
func (s *sequence) finish(reason string, err error) {
	if s.done {
		return
	}
	s.done = true
	s.finishReason, s.err = reason, err
	s.kv.release()
	if s.direct == nil {
		s.out.push(Event{Done: true, Finish: reason, Err: err})
	}
}

// emit hands out one accepted token and checks the stop conditions; it reports whether the
// sequence goes on.
func (s *sequence) emit(tok Token) bool {
	s.tokens = append(s.tokens, tok.ID)
	s.generated++
	s.e.count(func(c *Counters) {
		c.Tokens++
		c.ChosenDepth += uint64(tok.Depth)
		if tok.Probe {
			c.Probes++
		}
	})
	if s.direct != nil {
		if !s.direct(tok) {
			s.finish("cancelled", nil)
			return false
		}
	} else {
		ev := Event{Token: tok}
		if s.generated == 1 && s.req.PromptLogprobs {
			ev.Prompt, s.prompt = s.prompt, nil
		}
		s.out.push(ev)
	}
	switch {
	case s.stops[tok.ID]:
		s.finish("stop", nil)
	case s.hitStopString():
		s.finish("stop", nil)
	case s.generated >= s.req.MaxTokens || len(s.tokens) > s.e.ctxLen:
		s.finish("length", nil)
	}
	return !s.done
}

// scorePrompt records the prompt tokens that a completed prefill chunk's rows score: row i's
// exit logits give prompt token i+1 its log-probability.
func (s *sequence) scorePrompt(rows []rowState, logits func(*rowState) []float32) {
	if len(s.prompt) == 0 {
		s.prompt = append(make([]Token, 0, len(s.req.Prompt)), Token{ID: s.req.Prompt[0]})
	}
	for k := range rows {
		row := &rows[k]
		if !row.scores {
			continue
		}
		tok := Token{ID: s.req.Prompt[row.pos+1], Depth: row.chosen + 1}
		scoreToken(&tok, logits(row), s.req.TopLogprobs)
		s.prompt = append(s.prompt, tok)
	}
}

// hitStopString decodes only the tail that could hold a stop string: each token is at least
// one byte, so maxStop tokens cover any match ending at the newest token.
func (s *sequence) hitStopString() bool {
	if s.maxStop == 0 {
		return false
	}
	gen := s.tokens[len(s.req.Prompt):]
	tail := s.e.opts.Decode(gen[max(0, len(gen)-s.maxStop-1):])
	for _, str := range s.req.StopStrings {
		if strings.Contains(tail, str) {
			return true
		}
	}
	return false
}

// mailbox is an unbounded event queue between the engine (which never blocks on a slow
// consumer) and the request's forwarding goroutine.
type mailbox struct {
	mu     sync.Mutex
	q      []Event
	notify chan struct{}
}

func newMailbox() *mailbox { return &mailbox{notify: make(chan struct{}, 1)} }

func (m *mailbox) push(ev Event) {
	m.mu.Lock()
	m.q = append(m.q, ev)
	m.mu.Unlock()
	select {
	case m.notify <- struct{}{}:
	default:
	}
}

// stopGrace bounds how long a stopping engine waits for a consumer to take its last events.
const stopGrace = 5 * time.Second

// forward delivers events to ch until the Done event, then closes ch. It gives up (closing ch
// without Done) when ctx ends, since the consumer has left, or stopGrace after the engine stops.
func (m *mailbox) forward(ctx context.Context, stopped <-chan struct{}, ch chan<- Event) {
	defer close(ch)
	var grace <-chan time.Time
	for {
		m.mu.Lock()
		q := m.q
		m.q = nil
		m.mu.Unlock()
		for _, ev := range q {
			select {
			case ch <- ev:
			case <-ctx.Done():
				return
			case <-grace:
				return
			case <-stopped:
				// Keep delivering what is queued (the Done event included), for a while.
				stopped = nil
				grace = time.After(stopGrace)
				select {
				case ch <- ev:
				case <-ctx.Done():
					return
				case <-grace:
					return
				}
			}
			if ev.Done {
				return
			}
		}
		select {
		case <-m.notify:
		case <-ctx.Done():
			return
		case <-grace:
			return
		case <-stopped:
			stopped = nil
			grace = time.After(stopGrace)
		}
	}
}
