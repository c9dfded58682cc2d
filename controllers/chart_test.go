package controllers

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"text/template"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"
)

// chartDir is the Helm chart. No helm binary is available in CI, so the test renders it with
// text/template and the handful of Helm functions the chart uses (keep it to these).
var chartDir = filepath.Join("..", "charts", "loopserve")

type chartFiles string

// Get returns a file of the chart, as Helm's .Files.Get does.
func (f chartFiles) Get(name string) (string, error) {
	b, err := os.ReadFile(filepath.Join(string(f), name))
	return string(b), err
}

// renderChart renders every template of the chart with values.yaml merged with overrides.
func renderChart(t *testing.T, namespace string, overrides map[string]any) []*unstructured.Unstructured {
	t.Helper()
	var chart, values map[string]any
	readYAML(t, filepath.Join(chartDir, "Chart.yaml"), &chart)
	readYAML(t, filepath.Join(chartDir, "values.yaml"), &values)
	merge(values, overrides)

	tpl := template.New("chart").Option("missingkey=error")
	tpl.Funcs(template.FuncMap{
		"include": func(name string, data any) (string, error) {
			var b bytes.Buffer
			err := tpl.ExecuteTemplate(&b, name, data)
			return b.String(), err
		},
		"toYaml": func(v any) (string, error) {
			b, err := yaml.Marshal(v)
			return strings.TrimSuffix(string(b), "\n"), err
		},
		"fromYaml": func(s string) (map[string]any, error) {
			var m map[string]any
			return m, yaml.Unmarshal([]byte(s), &m)
		},
		"nindent": func(n int, s string) string {
			pad := strings.Repeat(" ", n)
			return "\n" + pad + strings.ReplaceAll(s, "\n", "\n"+pad)
		},
		"quote": func(s string) string { return fmt.Sprintf("%q", s) },
		"default": func(def, v any) any {
			if v == nil || v == "" || v == false || v == 0 {
				return def
			}
			return v
		},
	})
	files, err := filepath.Glob(filepath.Join(chartDir, "templates", "*"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tpl.New(filepath.Base(f)).Parse(string(b)); err != nil {
			t.Fatalf("parsing %s: %v", f, err)
		}
	}
	data := map[string]any{
		"Values":  values,
		"Chart":   map[string]any{"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
		"Release": map[string]any{"Name": "ls", "Namespace": namespace, "Service": "Helm"},
		"Files":   chartFiles(chartDir),
	}
	var objs []*unstructured.Unstructured
	for _, f := range files {
		name := filepath.Base(f)
		if !strings.HasSuffix(name, ".yaml") {
			continue
		}
		var out bytes.Buffer
		if err := tpl.ExecuteTemplate(&out, name, data); err != nil {
			t.Fatalf("rendering %s: %v", name, err)
		}
		for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(out.String(), -1) {
			obj := &unstructured.Unstructured{}
			if err := yaml.UnmarshalStrict([]byte(doc), &obj.Object); err != nil {
				t.Fatalf("%s renders invalid YAML: %v\n%s", name, err, doc)
			}
			if len(obj.Object) > 0 {
				objs = append(objs, obj)
			}
		}
	}
	return objs
}

func readYAML(t *testing.T, path string, into any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, into); err != nil {
		t.Fatalf("decoding %s: %v", path, err)
	}
}

// merge copies src into dst, recursing into maps.
func merge(dst, src map[string]any) {
	for k, v := range src {
		if sm, ok := v.(map[string]any); ok {
			if dm, ok := dst[k].(map[string]any); ok {
				merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
}

// TestChartRendersValidObjects renders the Helm chart (defaults, and with the optional gateway
// auth) and has the API server validate every object with a dry-run create.
func TestChartRendersValidObjects(t *testing.T) {
	tests := []struct {
		name      string
		overrides map[string]any
		wantKinds []string
	}{
		{"defaults", nil, []string{"ClusterRole", "ClusterRoleBinding", "Deployment", "Deployment", "Role", "RoleBinding", "Service", "Service", "ServiceAccount"}},
		{"gateway auth", map[string]any{"gateway": map[string]any{"tokenSecret": "gw-tokens"}}, nil},
		{"no gateway", map[string]any{"gateway": map[string]any{"enabled": false}}, []string{"ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"}},
		{"watch namespaces", nil, []string{"Deployment", "Deployment", "Role", "Role", "Role", "RoleBinding", "RoleBinding", "RoleBinding", "Service", "Service", "ServiceAccount"}},
		{"three NATS replicas", map[string]any{"nats": map[string]any{"replicas": 3}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := newNamespace(t)
			var wantArgs []string // operator flags the values must produce
			switch tt.name {
			case "watch namespaces":
				a, b := newNamespace(t), newNamespace(t)
				tt.overrides = map[string]any{"operator": map[string]any{"watchNamespaces": []any{a, b}}}
				wantArgs = []string{"--watch-namespaces=" + a, "--watch-namespaces=" + b}
			case "three NATS replicas":
				wantArgs = []string{"--nats-replicas=3"}
			}
			objs := renderChart(t, ns, tt.overrides)
			for _, obj := range objs {
				if obj.GetKind() != "Deployment" || obj.GetName() != "ls-operator" {
					continue
				}
				cs, _, _ := unstructured.NestedSlice(obj.Object, "spec", "template", "spec", "containers")
				args, _, _ := unstructured.NestedStringSlice(cs[0].(map[string]any), "args")
				for _, a := range wantArgs {
					if !slices.Contains(args, a) {
						t.Errorf("operator args %q lack %s", args, a)
					}
				}
			}
			var kinds []string
			for _, obj := range objs {
				kinds = append(kinds, obj.GetKind())
				if err := k8s.Create(context.Background(), obj, client.DryRunAll); err != nil {
					t.Errorf("API server refused %s %s: %v", obj.GetKind(), obj.GetName(), err)
				}
				if obj.GetKind() == "ClusterRole" || obj.GetKind() == "Role" && !strings.HasSuffix(obj.GetName(), "-leader-election") {
					var generated map[string]any
					readYAML(t, filepath.Join("..", "config", "rbac", "role.yaml"), &generated)
					if diff := cmp.Diff(obj.Object["rules"], generated["rules"]); diff != "" {
						t.Errorf("chart %s %s/%s rules differ from config/rbac/role.yaml (-chart +generated):\n%s", obj.GetKind(), obj.GetNamespace(), obj.GetName(), diff)
					}
				}
			}
			if tt.wantKinds != nil {
				slices.Sort(kinds)
				if diff := cmp.Diff(kinds, tt.wantKinds); diff != "" {
					t.Errorf("rendered kinds (-got +want):\n%s", diff)
				}
			}
		})
	}
}
