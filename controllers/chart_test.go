package controllers

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"
)

// chartDir is the Helm chart. The tests render it with the real helm (built from the Go module
// proxy by hack/chart-tools.sh, which `make test` runs and points LOOPSERVE_CHART_TOOLS at).
var chartDir = filepath.Join("..", "charts", "loopserve")

// chartTools is the folder hack/chart-tools.sh prints: helm and the Prometheus Operator CRDs.
func chartTools(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("LOOPSERVE_CHART_TOOLS")
	if dir == "" {
		t.Fatal("LOOPSERVE_CHART_TOOLS is unset: run the tests with `make test`, which builds helm (hack/chart-tools.sh) and sets it")
	}
	return dir
}

// helm runs the helm binary with args and returns its standard output.
func helm(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(filepath.Join(chartTools(t), "helm"), args...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+t.TempDir(), "HELM_CONFIG_HOME="+t.TempDir(), "HELM_DATA_HOME="+t.TempDir())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("helm %s: %w\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

// valuesFile writes values as a values file for helm's -f.
func valuesFile(t *testing.T, values map[string]any) string {
	t.Helper()
	b, err := yaml.Marshal(values)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// renderChart renders the chart with `helm template` (release "ls"), values.yaml merged with
// overrides, and decodes every manifest.
func renderChart(t *testing.T, namespace string, overrides map[string]any) []*unstructured.Unstructured {
	t.Helper()
	out, err := helm(t, "template", "ls", chartDir, "--namespace", namespace, "-f", valuesFile(t, overrides))
	if err != nil {
		t.Fatal(err)
	}
	var objs []*unstructured.Unstructured
	for _, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(out, -1) {
		obj := &unstructured.Unstructured{}
		if err := yaml.UnmarshalStrict([]byte(doc), &obj.Object); err != nil {
			t.Fatalf("the chart renders invalid YAML: %v\n%s", err, doc)
		}
		if len(obj.Object) > 0 {
			objs = append(objs, obj)
		}
	}
	return objs
}

// installMonitoringCRDs installs the Prometheus Operator CRDs (ServiceMonitor) into envtest, once.
var installMonitoringCRDs = sync.OnceValue(func() error {
	dir := os.Getenv("LOOPSERVE_CHART_TOOLS")
	_, err := envtest.InstallCRDs(cfg, envtest.CRDInstallOptions{
		Paths:              []string{filepath.Join(dir, "crds", "monitoring.coreos.com_servicemonitors.yaml")},
		ErrorIfPathMissing: true,
	})
	return err
})

// fullValues turns every optional part of the chart on.
func fullValues(watch ...string) map[string]any {
	ns := make([]any, 0, len(watch))
	for _, w := range watch {
		ns = append(ns, w)
	}
	return map[string]any{
		"operator":       map[string]any{"watchNamespaces": ns},
		"gateway":        map[string]any{"tokenSecret": "gw-tokens"},
		"serviceMonitor": map[string]any{"enabled": true, "labels": map[string]any{"release": "kube-prometheus-stack"}},
		"dashboard":      map[string]any{"enabled": true},
		"quickstartNats": map[string]any{"enabled": true, "persistence": map[string]any{"enabled": true, "storageClassName": "standard"}},
	}
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

// TestChartRendersValidObjects renders the Helm chart with helm (defaults, each option, and every
// option at once) and has the API server validate every object with a dry-run create.
func TestChartRendersValidObjects(t *testing.T) {
	if err := installMonitoringCRDs(); err != nil {
		t.Fatalf("installing the ServiceMonitor CRD: %v", err)
	}
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
		{"service monitors", map[string]any{"serviceMonitor": map[string]any{"enabled": true}}, []string{"ClusterRole", "ClusterRoleBinding", "Deployment", "Deployment", "Role", "RoleBinding", "Service", "Service", "ServiceAccount", "ServiceMonitor", "ServiceMonitor", "ServiceMonitor"}},
		{"dashboard", map[string]any{"dashboard": map[string]any{"enabled": true}}, []string{"ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Deployment", "Role", "RoleBinding", "Service", "Service", "ServiceAccount"}},
		{"quickstart NATS", map[string]any{"quickstartNats": map[string]any{"enabled": true}}, []string{"ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Deployment", "Role", "RoleBinding", "Service", "Service", "Service", "ServiceAccount", "StatefulSet"}},
		{"full values", nil, []string{"ConfigMap", "ConfigMap", "Deployment", "Deployment", "Role", "Role", "RoleBinding", "RoleBinding", "Service", "Service", "Service", "ServiceAccount", "ServiceMonitor", "ServiceMonitor", "ServiceMonitor", "StatefulSet"}},
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
			case "quickstart NATS":
				wantArgs = []string{"--nats-url=nats://ls-nats." + ns + ".svc:4222"}
			case "full values":
				a := newNamespace(t)
				tt.overrides = fullValues(a)
				wantArgs = []string{"--watch-namespaces=" + a, "--nats-url=nats://ls-nats." + ns + ".svc:4222"}
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

// TestChartLints runs `helm lint --strict` with the default values and with every option on.
func TestChartLints(t *testing.T) {
	for name, values := range map[string]map[string]any{"defaults": nil, "full values": fullValues("team-a", "team-b")} {
		t.Run(name, func(t *testing.T) {
			out, err := helm(t, "lint", "--strict", chartDir, "-f", valuesFile(t, values))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(out, "1 chart(s) linted, 0 chart(s) failed") {
				t.Errorf("helm lint says:\n%s", out)
			}
		})
	}
}

// TestChartSchemaRefusesBadValues checks that values.schema.json turns bad values into an error
// naming the value, before anything is rendered.
func TestChartSchemaRefusesBadValues(t *testing.T) {
	tests := []struct {
		name   string
		values map[string]any
		want   string // in helm's error: where (a JSON pointer) or what
	}{
		{"unknown top-level key", map[string]any{"gatway": map[string]any{"enabled": false}}, "'gatway' not allowed"},
		{"unknown nested key", map[string]any{"operator": map[string]any{"replica": 2}}, "'replica' not allowed"},
		{"two NATS replicas", map[string]any{"nats": map[string]any{"replicas": 2}}, "/nats/replicas"},
		{"NATS URL without scheme", map[string]any{"nats": map[string]any{"url": "nats.nats.svc:4222"}}, "/nats/url"},
		{"negative gateway replicas", map[string]any{"gateway": map[string]any{"replicas": -1}}, "/gateway/replicas"},
		{"service type", map[string]any{"gateway": map[string]any{"service": map[string]any{"type": "Ingress"}}}, "/gateway/service/type"},
		{"resync not a duration", map[string]any{"operator": map[string]any{"resync": "five minutes"}}, "/operator/resync"},
		{"bad namespace name", map[string]any{"operator": map[string]any{"watchNamespaces": []any{"Team_A"}}}, "/operator/watchNamespaces/0"},
		{"enabled as a string", map[string]any{"quickstartNats": map[string]any{"enabled": "yes"}}, "/quickstartNats/enabled"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := helm(t, "template", "ls", chartDir, "-f", valuesFile(t, tt.values))
			if err == nil {
				t.Fatalf("helm template accepted %v", tt.values)
			}
			if !strings.Contains(err.Error(), "values don't meet the specifications of the schema") || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("helm's error does not name %s as a schema violation:\n%v", tt.want, err)
			}
		})
	}
}
