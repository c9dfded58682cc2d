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
	workers := runtime.GOMAXPROCS(0)
	const line = 64
	words := size / 8 / int64(workers) / (line / 8) * (line / 8) // per worker, whole lines
	if words <= 0 || passes <= 0 {
		return Bandwidth{}, fmt.Errorf("measuring bandwidth: size %d and passes %d must be positive", size, passes)
	}
	buf := make([]uint64, words*int64(workers)) // [workers * words]
	parts := make([][]uint64, workers)
	for w := range parts {
		parts[w] = buf[int64(w)*words : int64(w+1)*words]
	}
	run := func(fn func([]uint64) uint64) uint64 {
		var wg sync.WaitGroup
		sums := make([]uint64, workers)
		for w := range parts {
			wg.Go(func() { sums[w] = fn(parts[w]) })
		}
		wg.Wait()
		var s uint64
		for _, v := range sums {
			s += v
		}
		return s
	}
	run(fill)
	res := Bandwidth{Bytes: words * int64(workers) * 8, Workers: workers, Best: time.Duration(1<<63 - 1)}
	var sink uint64
	for range passes {
		if err := ctx.Err(); err != nil {
			return Bandwidth{}, err
		}
		start := time.Now()
		sink += run(sumWords)
		if d := time.Since(start); d < res.Best {
			res.Best = d
		}
		res.Passes++
	}
	if sink == 1 { // keeps the sums live; never true for the filled pattern
		res.Passes++
	}
	return res, nil
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
