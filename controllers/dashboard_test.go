package controllers

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/loopserve/loopserve/runtime/serve"
)

// describingRegisterer records the metric names of every collector registered with it, as
// Prometheus exposes them (a histogram as name_bucket, name_sum and name_count), with their
// label names (a histogram's buckets also have le).
type describingRegisterer struct {
	names map[string][]string
}

var (
	fqName         = regexp.MustCompile(`fqName: "([^"]+)"`)
	variableLabels = regexp.MustCompile(`variableLabels: \{([^}]*)\}`)
)

func (r *describingRegisterer) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 16)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		m := fqName.FindStringSubmatch(d.String())
		if m == nil {
			continue
		}
		var labels []string
		if l := variableLabels.FindStringSubmatch(d.String()); l != nil && l[1] != "" {
			labels = strings.Split(l[1], ",")
		}
		switch c.(type) {
		case *prometheus.HistogramVec, prometheus.Histogram:
			r.names[m[1]+"_bucket"] = append(slices.Clone(labels), "le")
			r.names[m[1]+"_sum"] = labels
			r.names[m[1]+"_count"] = labels
		default:
			r.names[m[1]] = labels
		}
	}
	return nil
}

func (r *describingRegisterer) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		_ = r.Register(c)
	}
}

func (r *describingRegisterer) Unregister(prometheus.Collector) bool { return false }

// dashboard is the part of a Grafana dashboard the test reads.
type dashboard struct {
	Panels []struct {
		Title   string `json:"title"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
	Templating struct {
		List []struct {
			Name       string `json:"name"`
			Definition string `json:"definition"`
		} `json:"list"`
	} `json:"templating"`
}

// TestDashboardQueriesUseExportedMetrics checks that every query of the chart's Grafana
// dashboard names only metrics the workers and gateways register (serve.NewMetrics, what
// `loopserve worker` and `loopserve gateway` serve on /metrics) or the operator exports (the
// tuning loop's decision, per tier), and that the dashboard has the panels it promises.
func TestDashboardQueriesUseExportedMetrics(t *testing.T) {
	reg := &describingRegisterer{names: map[string][]string{}}
	if _, err := serve.NewMetrics(reg); err != nil {
		t.Fatal(err)
	}
	reg.MustRegister(statsRejected, tunedThreshold, wantedReplicas, predictedDepth, predictedLatency)
	if len(reg.names) == 0 {
		t.Fatal("serve.NewMetrics registered no metrics")
	}
	b, err := os.ReadFile(filepath.Join(chartDir, "files", "dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("decoding the dashboard: %v", err)
	}
	metric := regexp.MustCompile(`\bloopserve_[a-zA-Z0-9_]+`)
	// Label names in grouping clauses (by, ignoring, on) and in selectors.
	grouping := regexp.MustCompile(`\b(?:by|ignoring|on)\s*\(([^)]*)\)`)
	matcher := regexp.MustCompile(`[{,]\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)`)
	check := func(where, expr string) {
		used := metric.FindAllString(expr, -1)
		if len(used) == 0 {
			t.Errorf("%s: query %q names no loopserve metric", where, expr)
		}
		known := map[string]bool{}
		for _, m := range used {
			labels, ok := reg.names[m]
			if !ok {
				t.Errorf("%s: query %q names %s, which loopserve does not export", where, expr, m)
			}
			for _, l := range labels {
				known[l] = true
			}
		}
		var labels []string
		for _, g := range grouping.FindAllStringSubmatch(expr, -1) {
			for _, l := range strings.Split(g[1], ",") {
				if l = strings.TrimSpace(l); l != "" {
					labels = append(labels, l)
				}
			}
		}
		for _, m := range matcher.FindAllStringSubmatch(expr, -1) {
			labels = append(labels, m[1])
		}
		for _, l := range labels {
			if !known[l] {
				t.Errorf("%s: query %q uses label %s, which none of its metrics has", where, expr, l)
			}
		}
	}
	var titles []string
	for _, p := range d.Panels {
		titles = append(titles, p.Title)
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			check("panel "+p.Title, tg.Expr)
		}
	}
	for _, v := range d.Templating.List {
		if v.Definition != "" {
			check("variable "+v.Name, v.Definition)
		}
	}
	want := []string{
		"Agreement with full depth", "Exit threshold τ in force", "Gateway requests by status",
		"Inter-token latency", "Inter-token latency p95 vs SLO", "Loop steps/s", "Loop-depth distribution",
		"Mean loop depth vs SLO", "Requests in flight and batch", "Time to first token", "Tokens/s", "Worker replicas",
	}
	sort.Strings(titles)
	if diff := cmp.Diff(titles, want); diff != "" {
		t.Errorf("dashboard panels (-got +want):\n%s", diff)
	}
	if !slices.IsSorted(want) {
		t.Fatal("want is not sorted")
	}
}
