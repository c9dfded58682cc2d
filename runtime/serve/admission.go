package serve

import (
	"context"
	"math"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/loopserve/loopserve/bus"
)

// queueState is what admission knows of a LoopModel's work queue: requests waiting for a
// worker and requests being generated.
type queueState struct {
	Waiting int // stored, not yet delivered (the consumer's NumPending)
	Running int // delivered, not yet acked (NumAckPending)
}

// estimateWait is how long a request queued now waits before a worker takes it. Requests wait
// only while every worker is full (a worker with a free slot fetches at once), so all Waiting
// requests are ahead of it, and they leave the queue as the Running ones finish: Running per
// service time. Zero with nobody waiting; 0, false when no service time was measured yet.
func estimateWait(q queueState, service time.Duration) (time.Duration, bool) {
	if service <= 0 {
		return 0, false
	}
	if q.Waiting <= 0 {
		return 0, true
	}
	// With nothing running (workers restarting) count one at a time.
	rate := float64(max(q.Running, 1)) / service.Seconds()
	wait := float64(q.Waiting) / rate
	if wait > float64(math.MaxInt64/2)/float64(time.Second) {
		return time.Duration(math.MaxInt64 / 2), true
	}
	return time.Duration(wait * float64(time.Second)), true
}

// admit decides whether a request fits its timeout: queued now, it waits estimateWait and is
// then served in about service. When it does not fit it returns the advised Retry-After: how
// long until the backlog has shrunk enough.
func admit(q queueState, service, timeout time.Duration) (ok bool, retryAfter time.Duration) {
	wait, known := estimateWait(q, service)
	if !known || wait+service <= timeout {
		return true, 0
	}
	return false, wait + service - timeout
}

// admission keeps, per LoopModel, the queue state (refreshed in the background at most every
// queueInfoMaxAge) and the mean service time the workers report. Safe for concurrent use.
type admission struct {
	js jetstream.JetStream
	wg *sync.WaitGroup // the gateway's: Run waits for the refreshes

	mu     sync.Mutex
	ctx    context.Context // ends the refreshes; nil until the gateway runs
	models map[string]*modelLoad
}

type modelLoad struct {
	state      queueState
	stateAt    time.Time
	refreshing bool
	service    float64 // EWMA of service seconds; 0 until the first report
}

// queueInfoMaxAge is how stale the queue state may be before a refresh starts; the request
// that finds it stale is still judged on the old state (no request waits for the refresh).
const queueInfoMaxAge = time.Second

// serviceEWMA weighs each new service time.
const serviceEWMA = 0.2

func newAdmission(js jetstream.JetStream, wg *sync.WaitGroup) *admission {
	return &admission{js: js, wg: wg, models: make(map[string]*modelLoad)}
}

// run lets refreshes start until ctx ends or stop is called.
func (a *admission) run(ctx context.Context) {
	a.mu.Lock()
	a.ctx = ctx
	a.mu.Unlock()
}

// stop starts no more refreshes; those running end with the context given to run.
func (a *admission) stop() {
	a.mu.Lock()
	a.ctx = nil
	a.mu.Unlock()
}

func (a *admission) model(r bus.Ref) *modelLoad {
	m := a.models[r.String()]
	if m == nil {
		m = &modelLoad{}
		a.models[r.String()] = m
	}
	return m
}

// observe records a finished request's service time (the worker's own measure).
func (a *admission) observe(r bus.Ref, seconds float64) {
	if !(seconds > 0) {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.model(r)
	if m.service == 0 {
		m.service = seconds
		return
	}
	m.service += serviceEWMA * (seconds - m.service)
}

// check judges a request against timeout and starts a refresh of the queue state when it is stale.
func (a *admission) check(r bus.Ref, timeout time.Duration) (bool, time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.model(r)
	if ctx := a.ctx; time.Since(m.stateAt) > queueInfoMaxAge && !m.refreshing && ctx != nil && ctx.Err() == nil {
		m.refreshing = true
		a.wg.Go(func() { a.refresh(ctx, r) })
	}
	if m.stateAt.IsZero() {
		return true, 0
	}
	return admit(m.state, time.Duration(m.service*float64(time.Second)), timeout)
}

func (a *admission) refresh(ctx context.Context, r bus.Ref) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var st queueState
	c, err := a.js.Consumer(ctx, r.Stream(), bus.ConsumerName)
	if err == nil {
		info := c.CachedInfo()
		st = queueState{Waiting: int(info.NumPending), Running: info.NumAckPending}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	m := a.model(r)
	m.refreshing = false
	if err == nil {
		m.state, m.stateAt = st, time.Now()
	}
}
