package sim

import (
	"fmt"
	"io"
	"math"
	"strings"
)

// WriteSVG draws one run over the trace: the request rate, replicas ready and wanted, τ, and
// the measured ITL p95 against the SLO, in three stacked panels sharing the time axis.
func WriteSVG(w io.Writer, r Result, c Config) error {
	const W, H, left, right, top, panel, gap = 900.0, 560.0, 60.0, 20.0, 30.0, 150.0, 30.0
	if len(r.Series) == 0 {
		return fmt.Errorf("plotting %s: no intervals", r.Policy)
	}
	end := c.Trace.End
	x := func(t float64) float64 { return left + (W-left-right)*t/end }
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n", W, H, W, H)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%.0f" y="18" font-size="14">%s: ITL attainment %.2f%%, %.0f replica-seconds, agreement %.3f</text>`+"\n", left, r.Policy, 100*r.Attainment, r.ReplicaSeconds, r.Agreement)
	line := func(y0, scale float64, val func(Point) float64, colour, dash string) {
		var pts []string
		for _, p := range r.Series {
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(p.T), y0+panel-panel*min(val(p)/scale, 1)))
		}
		fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.5" stroke-dasharray="%s" points="%s"/>`+"\n", colour, dash, strings.Join(pts, " "))
	}
	frame := func(y0 float64, title string, scale float64, unit string) {
		fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="%.0f" height="%.0f" fill="none" stroke="#999"/>`+"\n", left, y0, W-left-right, panel)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f">%s</text>`+"\n", left+6, y0+14, title)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" text-anchor="end">%s</text>`+"\n", left-4, y0+10, trimNum(scale)+unit)
		fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" text-anchor="end">0</text>`+"\n", left-4, y0+panel)
	}
	// panel 1: request rate and replicas
	y := top
	maxRate, maxRep := 0.0, 0.0
	for _, p := range r.Series {
		maxRate = max(maxRate, p.Rate)
		maxRep = max(maxRep, float64(p.Want), float64(p.Ready))
	}
	maxRep = math.Ceil(maxRep/5) * 5
	frame(y, fmt.Sprintf("replicas ready (blue) and wanted (dashed), request rate (grey, peak %.0f/s)", maxRate), maxRep, "")
	line(y, maxRate*1.05, func(p Point) float64 { return p.Rate }, "#bbb", "")
	line(y, maxRep, func(p Point) float64 { return float64(p.Want) }, "#1f77b4", "4 3")
	line(y, maxRep, func(p Point) float64 { return float64(p.Ready) }, "#1f77b4", "")
	// panel 2: τ with the floor and ceiling
	y += panel + gap
	frame(y, fmt.Sprintf("exit threshold τ (ceiling %.2f, floor %.2f)", c.Ceiling, c.Floor), 1, "")
	for _, v := range []float64{c.Ceiling, c.Floor} {
		fmt.Fprintf(&b, `<line x1="%.0f" x2="%.0f" y1="%.1f" y2="%.1f" stroke="#ccc" stroke-dasharray="2 2"/>`+"\n", left, W-right, y+panel-panel*v, y+panel-panel*v)
	}
	line(y, 1, func(p Point) float64 { return p.Tau }, "#2ca02c", "")
	// panel 3: ITL p95 against the SLO
	y += panel + gap
	scale := 2 * c.ITLSLO
	frame(y, fmt.Sprintf("measured ITL p95 (red) against the SLO %.0f ms (dashed)", c.ITLSLO*1000), scale*1000, " ms")
	fmt.Fprintf(&b, `<line x1="%.0f" x2="%.0f" y1="%.1f" y2="%.1f" stroke="#d62728" stroke-dasharray="4 3"/>`+"\n", left, W-right, y+panel/2, y+panel/2)
	line(y, scale, func(p Point) float64 { return p.P95 }, "#d62728", "")
	fmt.Fprintf(&b, `<text x="%.0f" y="%.0f">0 s</text><text x="%.0f" y="%.0f" text-anchor="end">%.0f s</text>`+"\n", left, y+panel+16, W-right, y+panel+16, end)
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func trimNum(v float64) string {
	s := fmt.Sprintf("%.2f", v)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}
