package sim

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
)

// ErrTrace reports a trace file that cannot be replayed.
var ErrTrace = errors.New("invalid trace")

// Trace is a piecewise-constant request rate: Rate[i] requests/s from T[i] until T[i+1] (the
// last until End).
type Trace struct {
	T    []float64
	Rate []float64
	End  float64
}

// RateAt is the request rate at time t.
func (tr Trace) RateAt(t float64) float64 {
	i, j := 0, len(tr.T)
	for j-i > 1 { // last segment starting at or before t
		m := (i + j) / 2
		if tr.T[m] <= t {
			i = m
		} else {
			j = m
		}
	}
	return tr.Rate[i]
}

// Mean is the time-weighted mean rate.
func (tr Trace) Mean() float64 {
	s := 0.0
	for i := range tr.T {
		end := tr.End
		if i+1 < len(tr.T) {
			end = tr.T[i+1]
		}
		s += tr.Rate[i] * (end - tr.T[i])
	}
	return s / (tr.End - tr.T[0])
}

// ParseTrace reads CSV lines `t_seconds,requests_per_second` (a header line naming them is
// allowed, blank lines and # comments are skipped): times start at 0 and strictly increase,
// rates are finite and non-negative, at most 1e6 rows. The last row lasts 60 s.
func ParseTrace(r io.Reader) (Trace, error) {
	var tr Trace
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), 4096)
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		if len(tr.T) == 0 && strings.HasPrefix(strings.ToLower(s), "t_seconds") {
			continue
		}
		a, b, ok := strings.Cut(s, ",")
		if !ok {
			return Trace{}, fmt.Errorf("%w: line %d: want t_seconds,requests_per_second, got %q", ErrTrace, line, clip(s))
		}
		t, err1 := strconv.ParseFloat(strings.TrimSpace(a), 64)
		rate, err2 := strconv.ParseFloat(strings.TrimSpace(b), 64)
		switch {
		case err1 != nil || err2 != nil:
			return Trace{}, fmt.Errorf("%w: line %d: %q is not two numbers", ErrTrace, line, clip(s))
		case math.IsNaN(t) || math.IsInf(t, 0) || t < 0 || t > 1e7:
			return Trace{}, fmt.Errorf("%w: line %d: time %v outside [0, 1e7] s", ErrTrace, line, t)
		case math.IsNaN(rate) || math.IsInf(rate, 0) || rate < 0 || rate > 1e5:
			return Trace{}, fmt.Errorf("%w: line %d: rate %v outside [0, 1e5] requests/s", ErrTrace, line, rate)
		case len(tr.T) == 0 && t != 0:
			return Trace{}, fmt.Errorf("%w: line %d: the first row must be at t=0, got %v", ErrTrace, line, t)
		case len(tr.T) > 0 && t <= tr.T[len(tr.T)-1]:
			return Trace{}, fmt.Errorf("%w: line %d: time %v does not increase", ErrTrace, line, t)
		case len(tr.T) >= 1e6:
			return Trace{}, fmt.Errorf("%w: more than 1e6 rows", ErrTrace)
		}
		tr.T = append(tr.T, t)
		tr.Rate = append(tr.Rate, rate)
	}
	if err := sc.Err(); err != nil {
		return Trace{}, fmt.Errorf("%w: line %d: %v", ErrTrace, line+1, err)
	}
	if len(tr.T) == 0 {
		return Trace{}, fmt.Errorf("%w: no rows", ErrTrace)
	}
	tr.End = tr.T[len(tr.T)-1] + 60
	return tr, nil
}

func clip(s string) string {
	if len(s) > 60 {
		return s[:60] + "…"
	}
	return s
}

// Base curves of a Shape, around which the rate swings by Swing·Mean.
const (
	Diurnal = "diurnal" // a sine of one Period
	Steps   = "step"    // a new level, drawn from the seed, every Period/4
	Ramp    = "ramp"    // a triangle: up over Period/2, down over the next
)

// Shape parameterises the synthetic trace family: a base curve plus random spikes.
type Shape struct {
	Base     string  // Diurnal (also when empty), Steps or Ramp
	Seconds  float64 // length
	Mean     float64 // requests/s around which the base curve swings
	Swing    float64 // amplitude as a share of Mean
	Period   float64 // seconds of one cycle
	Spikes   int     // bursts over the trace
	SpikeMax float64 // a burst multiplies the rate by 1.5 up to this (overlapping: the largest)
}

// DefaultShape is the default trace: a compressed day of one hour with six bursts.
var DefaultShape = Shape{Base: Diurnal, Seconds: 3600, Mean: 80, Swing: 0.6, Period: 3600, Spikes: 6, SpikeMax: 2.5}

// Shapes are the named trace shapes of the benchmark: the default diurnal hour, a step load,
// a ramp up and down, and a bursty hour (many short, sharper bursts on a flatter day).
var Shapes = map[string]Shape{
	"diurnal": DefaultShape,
	"step":    {Base: Steps, Seconds: 3600, Mean: 80, Swing: 0.6, Period: 1200, Spikes: 3, SpikeMax: 2},
	"ramp":    {Base: Ramp, Seconds: 3600, Mean: 80, Swing: 0.7, Period: 3600, Spikes: 4, SpikeMax: 2.5},
	"bursty":  {Base: Diurnal, Seconds: 3600, Mean: 70, Swing: 0.3, Period: 3600, Spikes: 16, SpikeMax: 3},
}

// ShapeNames lists Shapes' keys in a fixed order.
var ShapeNames = []string{"diurnal", "step", "ramp", "bursty"}

// Synthetic draws a trace of the shape from seed, in 10 s steps.
func Synthetic(sh Shape, seed uint64) Trace {
	rng := rand.New(rand.NewPCG(seed, 0x7ace))
	phase := rng.Float64() * 2 * math.Pi
	type spike struct{ at, dur, mul float64 }
	sp := make([]spike, sh.Spikes)
	for i := range sp {
		sp[i] = spike{at: rng.Float64() * sh.Seconds, dur: 30 + rng.Float64()*90, mul: 1.5 + rng.Float64()*(sh.SpikeMax-1.5)}
	}
	var levels []float64
	if sh.Base == Steps {
		for range int(math.Ceil(sh.Seconds/(sh.Period/4))) + 1 {
			levels = append(levels, 2*rng.Float64()-1)
		}
	}
	var tr Trace
	for t := 0.0; t < sh.Seconds; t += 10 {
		x := math.Sin(2*math.Pi*t/sh.Period + phase) // Diurnal
		switch sh.Base {
		case Steps:
			x = levels[int(t/(sh.Period/4))]
		case Ramp:
			f := math.Mod(t/sh.Period, 1)
			x = 4*min(f, 1-f) - 1 // -1 at the ends, +1 half-way
		}
		mul := 1.0 // overlapping bursts do not compound: the largest applies
		for _, s := range sp {
			if t >= s.at && t < s.at+s.dur {
				mul = max(mul, s.mul)
			}
		}
		r := sh.Mean * (1 + sh.Swing*x) * mul
		tr.T = append(tr.T, t)
		tr.Rate = append(tr.Rate, max(r, 0))
	}
	tr.End = sh.Seconds
	return tr
}
