package sim

import (
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseTrace(t *testing.T) {
	got, err := ParseTrace(strings.NewReader("t_seconds,requests_per_second\n0,10\n# burst\n\n30, 50.5\n90,0\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := Trace{T: []float64{0, 30, 90}, Rate: []float64{10, 50.5, 0}, End: 150}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("ParseTrace (-got +want):\n%s", diff)
	}
	for _, c := range []struct{ t, want float64 }{{0, 10}, {29.9, 10}, {30, 50.5}, {100, 0}} {
		if r := got.RateAt(c.t); r != c.want {
			t.Errorf("RateAt(%v) = %v, want %v", c.t, r, c.want)
		}
	}
	if m := got.Mean(); m != (10*30+50.5*60)/150 {
		t.Errorf("Mean = %v", m)
	}
}

func TestParseTraceRefuses(t *testing.T) {
	for _, c := range []struct{ name, in, msg string }{
		{"empty", "", "no rows"},
		{"header only", "t_seconds,requests_per_second\n", "no rows"},
		{"one column", "0\n", "want t_seconds,requests_per_second"},
		{"words", "0,ten\n", "is not two numbers"},
		{"late start", "5,1\n", "must be at t=0"},
		{"not increasing", "0,1\n10,2\n10,3\n", "line 3: time 10 does not increase"},
		{"negative rate", "0,-1\n", "rate -1 outside"},
		{"NaN", "0,NaN\n", "rate NaN outside"},
		{"infinite time", "0,1\n+Inf,1\n", "time +Inf outside"},
		{"long line", "0," + strings.Repeat("1", 5000) + "\n", "token too long"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseTrace(strings.NewReader(c.in))
			if !errors.Is(err, ErrTrace) || !strings.Contains(err.Error(), c.msg) {
				t.Errorf("ParseTrace = %v, want ErrTrace saying %q", err, c.msg)
			}
		})
	}
}

func FuzzParseTrace(f *testing.F) {
	f.Add("t_seconds,requests_per_second\n0,10\n30,50\n")
	f.Add("0,1e5\n1e7,0\n")
	f.Add("0,1\n#x\n\n1,2")
	f.Fuzz(func(t *testing.T, in string) {
		tr, err := ParseTrace(strings.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrTrace) {
				t.Fatalf("error %v does not wrap ErrTrace", err)
			}
			return
		}
		if len(tr.T) == 0 || len(tr.T) != len(tr.Rate) || tr.T[0] != 0 || !(tr.End > tr.T[len(tr.T)-1]) {
			t.Fatalf("accepted a malformed trace %+v", tr)
		}
		for i := range tr.T {
			if i > 0 && !(tr.T[i] > tr.T[i-1]) || !(tr.Rate[i] >= 0) {
				t.Fatalf("row %d: %v,%v", i, tr.T[i], tr.Rate[i])
			}
		}
		_ = tr.Mean()
		_ = tr.RateAt(tr.End / 2)
	})
}

func TestSyntheticIsSeeded(t *testing.T) {
	a, b, c := Synthetic(DefaultShape, 1), Synthetic(DefaultShape, 1), Synthetic(DefaultShape, 2)
	if diff := cmp.Diff(a, b); diff != "" {
		t.Errorf("same seed, different traces:\n%s", diff)
	}
	if cmp.Equal(a, c) {
		t.Error("seeds 1 and 2 gave the same trace")
	}
	if m := a.Mean(); m < 0.8*DefaultShape.Mean || m > 1.5*DefaultShape.Mean {
		t.Errorf("mean rate %v far from the shape's %v", m, DefaultShape.Mean)
	}
}

// TestShapes: without spikes, a step load holds each level for a quarter period, a ramp runs
// from Mean·(1−Swing) at the start to Mean·(1+Swing) half-way, and every named shape is seeded.
func TestShapes(t *testing.T) {
	step := Shapes["step"]
	step.Spikes = 0
	tr := Synthetic(step, 5)
	q := step.Period / 4
	for i := range tr.T {
		lvl := tr.RateAt(math.Floor(tr.T[i]/q) * q)
		if tr.Rate[i] != lvl {
			t.Fatalf("step: rate %v at %v s, want the quarter-period's level %v", tr.Rate[i], tr.T[i], lvl)
		}
		if lvl < step.Mean*(1-step.Swing)-1e-9 || lvl > step.Mean*(1+step.Swing)+1e-9 {
			t.Fatalf("step: level %v outside the swing", lvl)
		}
	}
	ramp := Shapes["ramp"]
	ramp.Spikes = 0
	tr = Synthetic(ramp, 5)
	for _, c := range []struct{ t, want float64 }{{0, ramp.Mean * (1 - ramp.Swing)}, {ramp.Period / 2, ramp.Mean * (1 + ramp.Swing)}, {ramp.Period / 4, ramp.Mean}} {
		if got := tr.RateAt(c.t); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("ramp: rate %v at %v s, want %v", got, c.t, c.want)
		}
	}
	for _, name := range ShapeNames {
		a, b := Synthetic(Shapes[name], 7), Synthetic(Shapes[name], 7)
		if diff := cmp.Diff(a, b); diff != "" {
			t.Errorf("%s: same seed, different traces:\n%s", name, diff)
		}
		if a.End != Shapes[name].Seconds || a.T[0] != 0 {
			t.Errorf("%s: trace spans [%v, %v], want [0, %v]", name, a.T[0], a.End, Shapes[name].Seconds)
		}
	}
}
