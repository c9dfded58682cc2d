// Package bench measures the runtime's speed: this machine's memory bandwidth (the limit on
// batch-1 decode, which streams every weight once per token) and the decode and prefill rates
// of the engine and of its PyTorch peer.
package bench

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Bandwidth is the result of a streaming-read measurement.
type Bandwidth struct {
	Bytes   int64         // bytes read per pass
	Best    time.Duration // fastest pass
	Passes  int           // passes timed
	Workers int           // goroutines reading in parallel
}

// GBPerSec is the best pass's read rate in 10⁹ bytes per second.
func (b Bandwidth) GBPerSec() float64 {
	if b.Best <= 0 {
		return 0
	}
	return float64(b.Bytes) / b.Best.Seconds() / 1e9
}

// MeasureBandwidth streams a buffer of size bytes (rounded down to whole cache lines per
// worker; it must be far larger than the last-level cache) once per pass with one goroutine per
// GOMAXPROCS, and keeps the best of passes. It allocates the buffer and touches it first so that
// page faults are not timed. It returns ctx's error if cancelled between passes.
func MeasureBandwidth(ctx context.Context, size int64, passes int) (Bandwidth, error) {
	if passes <= 0 {
		return Bandwidth{}, fmt.Errorf("measuring bandwidth: passes %d must be positive", passes)
	}
	p, err := NewProbe(size)
	if err != nil {
		return Bandwidth{}, err
	}
	return p.Measure(ctx, passes)
}

// Measure streams the whole probe once per pass and keeps the best of passes, as
// MeasureBandwidth does, without allocating. It returns ctx's error if cancelled between
// passes.
func (p *Probe) Measure(ctx context.Context, passes int) (Bandwidth, error) {
	if passes <= 0 {
		return Bandwidth{}, fmt.Errorf("measuring bandwidth: passes %d must be positive", passes)
	}
	res := Bandwidth{Workers: len(p.parts), Best: time.Duration(1<<63 - 1)}
	for range passes {
		if err := ctx.Err(); err != nil {
			return Bandwidth{}, err
		}
		read, d := p.Stream(p.Size())
		if d < res.Best {
			res.Best = d
		}
		res.Bytes = read
		res.Passes++
	}
	return res, nil
}

// Probe is a filled buffer, far larger than the last-level cache, that Stream reads with one
// goroutine per GOMAXPROCS (at NewProbe): MeasureBandwidth's passes, and the bandwidth read
// beside each decoded token by PairedDecode. Not safe for concurrent use.
type Probe struct {
	parts [][]uint64 // [workers][words] each worker's share of the buffer
	next  int64      // word offset in every part where the next Stream starts
	sink  uint64
}

// NewProbe allocates and touches (so that page faults are not timed) a probe of size bytes,
// rounded down to whole cache lines per worker.
func NewProbe(size int64) (*Probe, error) {
	workers := runtime.GOMAXPROCS(0)
	const line = 64
	words := size / 8 / int64(workers) / (line / 8) * (line / 8) // per worker, whole lines
	if words <= 0 {
		return nil, fmt.Errorf("measuring bandwidth: size %d must be positive", size)
	}
	buf := make([]uint64, words*int64(workers)) // [workers * words]
	p := &Probe{parts: make([][]uint64, workers)}
	for w := range p.parts {
		p.parts[w] = buf[int64(w)*words : int64(w+1)*words]
	}
	var wg sync.WaitGroup
	for _, part := range p.parts {
		wg.Go(func() { fill(part) })
	}
	wg.Wait()
	return p, nil
}

// Size is the probe's buffer in bytes.
func (p *Probe) Size() int64 { return int64(len(p.parts)) * int64(len(p.parts[0])) * 8 }

// Stream reads bytes (rounded down to whole cache lines per worker) of the buffer, every
// worker its own part in parallel, continuing where the last call stopped and wrapping at
// its end, and returns the bytes it read and how long that took.
func (p *Probe) Stream(bytes int64) (int64, time.Duration) {
	words := len(p.parts[0])
	per := bytes / 8 / int64(len(p.parts)) / 8 * 8 // words per worker, whole lines
	sums := make([]uint64, len(p.parts))
	start := time.Now()
	var wg sync.WaitGroup
	for w, part := range p.parts {
		wg.Go(func() {
			at, left := int(p.next), per
			for left > 0 {
				n := int(min(left, int64(words-at)))
				sums[w] += sumWords(part[at : at+n])
				left -= int64(n)
				at = (at + n) % words
			}
		})
	}
	wg.Wait()
	d := time.Since(start)
	p.next = (p.next + per) % int64(words)
	for _, s := range sums {
		p.sink += s // keeps the sums live
	}
	return per * 8 * int64(len(p.parts)), d
}

func fill(p []uint64) uint64 {
	for i := range p {
		p[i] = uint64(i) * 0x9e3779b97f4a7c15
	}
	return 0
}

// LastLevelCache returns the size in bytes of the largest CPU cache Linux reports for cpu0, or
// 0 when unknown. Decode of a model whose weights fit in it is not bound by memory bandwidth,
// so a bandwidth fraction above 1 is possible there.
func LastLevelCache() int64 {
	var best int64
	for i := 0; i < 8; i++ {
		b, err := os.ReadFile(fmt.Sprintf("/sys/devices/system/cpu/cpu0/cache/index%d/size", i))
		if err != nil {
			continue
		}
		s := strings.TrimSpace(string(b))
		mult := int64(1)
		switch {
		case strings.HasSuffix(s, "K"):
			mult, s = 1<<10, strings.TrimSuffix(s, "K")
		case strings.HasSuffix(s, "M"):
			mult, s = 1<<20, strings.TrimSuffix(s, "M")
		}
		if v, err := strconv.ParseInt(s, 10, 64); err == nil && v*mult > best {
			best = v * mult
		}
	}
	return best
}
