package gatepolicy

import "math"

// Capacity is the per-replica model the Tuner fits from observed windows. A replica batches
// at step level: one engine iteration runs one loop step for every running request, and an
// iteration costs about t0 + t1·batch. At a per-replica load of L loop steps/s the iteration
// time is s(L) = t0 / (1 − L/C) with C = 1/t1 the loop-step rate one replica sustains, and a
// token of depth d waits d iterations:
//
//	ITL(d, L) = d · StepTime / (1 − L / LoopStepsPerSecond)
//
// The fit regresses 1/s on L (1/s = 1/t0 − L/(t0·C)) over the recent windows, with s the
// measured token-latency p95 over the measured depth; p95 rather than the mean is what the SLO
// bounds, so StepTime absorbs the tail factor.
type Capacity struct {
	StepTime           float64 // seconds per loop step of an idle replica (t0, at p95)
	LoopStepsPerSecond float64 // C: loop steps/s one replica sustains
	Points             int     // windows the fit rests on
}

// Known reports whether the model has both parameters.
func (c Capacity) Known() bool { return c.StepTime > 0 && c.LoopStepsPerSecond > 0 }

// ITL is the predicted inter-token latency p95 (seconds) of tokens of mean depth d at a
// per-replica load of load loop steps/s; +Inf at or above capacity.
func (c Capacity) ITL(d, load float64) float64 {
	if !c.Known() {
		return math.NaN()
	}
	u := load / c.LoopStepsPerSecond
	if u >= 1 {
		return math.Inf(1)
	}
	return d * c.StepTime / (1 - max(u, 0))
}

// MaxLoad is the largest per-replica load (loop steps/s) at which tokens of depth d meet an ITL
// of slo seconds; 0 when even an idle replica cannot.
func (c Capacity) MaxLoad(d, slo float64) float64 {
	if !c.Known() {
		return math.NaN()
	}
	return max(0, c.LoopStepsPerSecond*(1-d*c.StepTime/slo))
}

// fitPoint is one window's per-replica load and step time. A saturated window (every batch
// slot busy: requests queue) measures queueing, not the law above; it only bounds C from below.
type fitPoint struct {
	load, step float64
	saturated  bool
}

const fitPoints = 40

// fit estimates the capacity model from points (newest last); prior is returned where the
// points cannot say (a single load level, a non-physical slope).
func fit(points []fitPoint, prior Capacity) Capacity {
	c := prior
	c.Points = len(points)
	var sat float64
	var free []fitPoint
	for _, p := range points {
		if p.saturated {
			sat = max(sat, p.load)
		} else {
			free = append(free, p)
		}
	}
	// a saturated replica serves about its capacity
	c.LoopStepsPerSecond = max(c.LoopStepsPerSecond, sat)
	points = free
	n := len(points)
	if n == 0 {
		return c
	}
	var sw, sx, sy, sxx, sxy, maxL float64
	for i, p := range points {
		w := math.Pow(0.97, float64(n-1-i)) // forget old windows slowly
		x, y := p.load, 1/p.step
		sw += w
		sx += w * x
		sy += w * y
		sxx += w * x * x
		sxy += w * x * y
		maxL = max(maxL, p.load)
	}
	mx, my := sx/sw, sy/sw
	vx := sxx/sw - mx*mx
	newest := points[n-1]
	if vx > 0.01*mx*mx && vx > 0 {
		slope := (sxy/sw - mx*my) / vx
		icpt := my - slope*mx
		if slope < 0 && icpt > 0 {
			c.StepTime, c.LoopStepsPerSecond = 1/icpt, max(-icpt/slope, maxL*1.05, sat)
			// measured correction: never predict the newest window faster than it ran
			if pred := c.StepTime / (1 - newest.load/c.LoopStepsPerSecond); newest.step > pred {
				c.StepTime *= newest.step / pred
			}
			return c
		}
	}
	// One load level: C is not identifiable. Keep the prior (or assume the busiest window ran
	// at half of it) and take the step time from the newest window, so the model reproduces
	// what was measured last.
	if !(c.LoopStepsPerSecond > maxL) {
		c.LoopStepsPerSecond = max(2*maxL, c.LoopStepsPerSecond)
	}
	c.StepTime = newest.step * (1 - min(newest.load/c.LoopStepsPerSecond, 0.95))
	return c
}
