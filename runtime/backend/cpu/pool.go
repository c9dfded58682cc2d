package cpu

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// pool is a fixed set of goroutines taking kernel chunks: handing a chunk to a parked worker
// is cheaper than starting a goroutine per chunk, hundreds of times per token.
//
// A loop step's phases (stream.run) take a faster path, phase: worker w has a lane, a slot the
// caller fills and a worker spins on for a while after each task before it parks, and the
// caller spins for the workers' completion the same way. A full-depth 1.4B-shape token runs
// ~390 phases of 0.2–1.2 ms; handing each through a channel and a WaitGroup wakes a parked
// thread twice per phase (futex, an inter-processor interrupt under a hypervisor), tens of
// microseconds each, during which the memory bus idles. Spinning is bounded (spinFor), so an
// idle backend parks all its goroutines and costs nothing.
//
// Ownership: one phase runs at a time (gang); a stream that finds it busy (another stream of
// the same Backend stepping concurrently) hands its phase through the channel instead. A
// lane's task fields are written by the caller before it bumps seq and read by the worker
// after it sees seq change; the caller writes the next task only after pending reached zero.
type pool struct {
	work chan poolTask
	quit chan struct{}
	once sync.Once
	wg   sync.WaitGroup

	spin    time.Duration // spinFor, or 0 with one P (a spinning goroutine would hold it)
	gang    sync.Mutex
	lanes   []lane
	pending atomic.Int32 // lanes of the current phase not finished
	parked  atomic.Bool  // the caller sleeps on woken
	woken   chan struct{}
}

type poolTask struct {
	fn     func(lo, hi int)
	lo, hi int
	done   *sync.WaitGroup
}

// lane is one worker's phase slot, padded to its own cache lines.
type lane struct {
	seq    atomic.Uint64 // bumped once per task
	parked atomic.Bool   // the worker sleeps on wake
	wake   chan struct{}
	fn     func(lo, hi int)
	arg    int
	_      [64]byte
}

// spinFor is how long a worker polls its lane after a task, and the caller its workers'
// completion, before parking: longer than the gap between a step's phases and between the
// steps of a decoding batch, far shorter than a human-visible idle.
const spinFor = 200 * time.Microsecond

func newPool(workers int) *pool {
	p := &pool{work: make(chan poolTask, workers), quit: make(chan struct{}), lanes: make([]lane, workers), woken: make(chan struct{}, 1)}
	if runtime.GOMAXPROCS(0) > 1 {
		p.spin = spinFor
	}
	for i := range p.lanes {
		l := &p.lanes[i]
		l.wake = make(chan struct{}, 1)
		p.wg.Go(func() { p.serve(l) })
	}
	return p
}

// serve is one worker: its lane's tasks and the channel's chunks.
func (p *pool) serve(l *lane) {
	var last uint64
	for {
		if s := l.seq.Load(); s != last || p.poll(l, last) {
			last = l.seq.Load()
			l.fn(l.arg, 0)
			if p.pending.Add(-1) == 0 && p.parked.Load() {
				signal(p.woken)
			}
			continue
		}
		l.parked.Store(true)
		if l.seq.Load() != last {
			l.parked.Store(false)
			continue
		}
		select {
		case t := <-p.work:
			l.parked.Store(false)
			t.fn(t.lo, t.hi)
			t.done.Done()
		case <-l.wake:
			l.parked.Store(false)
		case <-p.quit:
			return
		}
	}
}

// poll spins until l has a task after last (true) or spinFor passes or a channel chunk waits
// (false).
func (p *pool) poll(l *lane, last uint64) bool {
	start := time.Now()
	for i := 1; ; i++ {
		if l.seq.Load() != last {
			return true
		}
		if i%64 == 0 && (len(p.work) > 0 || time.Since(start) > p.spin) {
			return false
		}
		spinPause()
	}
}

// phase runs fn(w, 0) for w in 1..t-1 on the workers and fn(0, 0) on the calling goroutine,
// and returns when all have; t-1 must not exceed the workers.
func (p *pool) phase(t int, fn func(lo, hi int)) {
	if !p.gang.TryLock() {
		var wg sync.WaitGroup
		wg.Add(t - 1)
		for w := 1; w < t; w++ {
			p.work <- poolTask{fn: fn, lo: w, done: &wg}
		}
		fn(0, 0)
		wg.Wait()
		return
	}
	defer p.gang.Unlock()
	p.pending.Store(int32(t - 1))
	for w := 1; w < t; w++ {
		l := &p.lanes[w-1]
		l.fn, l.arg = fn, w
		l.seq.Add(1)
		if l.parked.Load() {
			signal(l.wake)
		}
	}
	fn(0, 0)
	start := time.Now()
	for i := 1; p.pending.Load() > 0; i++ {
		if i%64 != 0 || time.Since(start) < p.spin {
			spinPause()
			continue
		}
		p.parked.Store(true)
		for p.pending.Load() > 0 {
			<-p.woken
		}
		p.parked.Store(false)
	}
}

// signal wakes the sleeper on c, if it is not woken already.
func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (p *pool) stop() {
	p.once.Do(func() { close(p.quit) })
	p.wg.Wait()
}
