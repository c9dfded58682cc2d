package controllers

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/loopserve/loopserve/runtime/serve"
)

// describingRegisterer records the metric names of every collector registered with it, as
// Prometheus exposes them (a histogram as name_bucket, name_sum and name_count).
type describingRegisterer struct {
	names map[string]bool
}

var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

func (r *describingRegisterer) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 16)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		m := fqName.FindStringSubmatch(d.String())
		if m == nil {
			continue
		}
		switch c.(type) {
		case *prometheus.HistogramVec, prometheus.Histogram:
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				r.names[m[1]+s] = true
			}
		default:
			r.names[m[1]] = true
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
// `loopserve worker` and `loopserve gateway` serve on /metrics), and that the dashboard has the
// panels it promises.
func TestDashboardQueriesUseExportedMetrics(t *testing.T) {
	reg := &describingRegisterer{names: map[string]bool{}}
	if _, err := serve.NewMetrics(reg); err != nil {
		t.Fatal(err)
	}
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
	check := func(where, expr string) {
		used := metric.FindAllString(expr, -1)
		if len(used) == 0 {
			t.Errorf("%s: query %q names no loopserve metric", where, expr)
		}
		for _, m := range used {
			if !reg.names[m] {
				t.Errorf("%s: query %q names %s, which loopserve does not export", where, expr, m)
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
