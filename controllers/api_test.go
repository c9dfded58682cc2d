package controllers

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/yaml"

	"github.com/loopserve/loopserve/api/v1alpha1"
)

// TestInvalidLoopModelsRejected: the API server itself (OpenAPI schema and CEL rules of the
// generated CRD) refuses invalid LoopModels with a message naming the problem.
func TestInvalidLoopModelsRejected(t *testing.T) {
	ns := newNamespace(t)
	tests := []struct {
		name   string
		change func(*v1alpha1.LoopModel)
		want   string
	}{
		{"min threshold above threshold", func(lm *v1alpha1.LoopModel) {
			lm.Spec.Loop.ExitThreshold = 0.6
			lm.Spec.Loop.MinExitThreshold = ptr.To(0.8)
		}, "minExitThreshold must be less than or equal to exitThreshold"},
		{"threshold above 1", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.ExitThreshold = 1.5 },
			"spec.loop.exitThreshold: Invalid value: 1.5: spec.loop.exitThreshold in body should be less than or equal to 1"},
		{"threshold negative", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.ExitThreshold = -0.1 },
			"spec.loop.exitThreshold in body should be greater than 0"},
		{"min threshold zero", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.MinExitThreshold = ptr.To(0.0) },
			"spec.loop.minExitThreshold in body should be greater than 0"},
		{"probe fraction above 0.5", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.ProbeFraction = ptr.To(0.6) },
			"spec.loop.probeFraction in body should be less than or equal to 0.5"},
		{"min replicas above max", func(lm *v1alpha1.LoopModel) {
			lm.Spec.Scaling.MinReplicas = 3
			lm.Spec.Scaling.MaxReplicas = 2
		}, "minReplicas must be less than or equal to maxReplicas"},
		{"two sources", func(lm *v1alpha1.LoopModel) {
			lm.Spec.Model.Source.PVC = &v1alpha1.PVCSource{ClaimName: "w"}
		}, "exactly one of pvc, hostPath, image or url must be set"},
		{"no source", func(lm *v1alpha1.LoopModel) { lm.Spec.Model.Source = v1alpha1.ModelSource{} },
			"exactly one of pvc, hostPath, image or url must be set"},
		{"path escapes the volume", func(lm *v1alpha1.LoopModel) { lm.Spec.Model.Path = "../etc" },
			"path must be relative and must not contain '..'"},
		{"absolute path", func(lm *v1alpha1.LoopModel) { lm.Spec.Model.Path = "/etc" },
			"path must be relative and must not contain '..'"},
		{"unknown kv policy", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.KVPolicy = "first" },
			`spec.loop.kvPolicy: Unsupported value: "first": supported values: "full", "last"`},
		{"unknown tuning mode", func(lm *v1alpha1.LoopModel) { lm.Spec.Tuning.Mode = "manual" },
			`spec.tuning.mode: Unsupported value: "manual"`},
		{"http NATS URL", func(lm *v1alpha1.LoopModel) { lm.Spec.NATS.URL = "http://nats:4222" },
			"spec.nats.url in body should match"},
		{"two NATS replicas", func(lm *v1alpha1.LoopModel) { lm.Spec.NATS.Replicas = 2 },
			`spec.nats.replicas: Unsupported value: 2: supported values: "1", "3", "5"`},
		{"zero steps", func(lm *v1alpha1.LoopModel) { lm.Spec.Loop.MaxSteps = -1 },
			"spec.loop.maxSteps in body should be greater than or equal to 1"},
		{"relative host path", func(lm *v1alpha1.LoopModel) { lm.Spec.Model.Source.HostPath.Path = "models" },
			"spec.model.source.hostPath.path in body should match '^/'"},
		{"url source with ftp", func(lm *v1alpha1.LoopModel) {
			lm.Spec.Model.Source = v1alpha1.ModelSource{URL: &v1alpha1.URLSource{URL: "ftp://x/m.tgz"}}
		}, "spec.model.source.url.url in body should match '^https?://'"},
		{"name too long for the Service", func(lm *v1alpha1.LoopModel) { lm.Name = strings.Repeat("a", 51) },
			"metadata.name must be a DNS-1035 label"},
		{"name starting with a digit", func(lm *v1alpha1.LoopModel) { lm.Name = "1model" },
			"metadata.name must be a DNS-1035 label"},
		{"tier named twice", func(lm *v1alpha1.LoopModel) {
			withTiers(lm, v1alpha1.Tier{Name: "gold"}, v1alpha1.Tier{Name: "gold"})
		}, `spec.tiers[1]: Duplicate value: {"name":"gold"}`},
		{"tier name not a DNS label", func(lm *v1alpha1.LoopModel) {
			withTiers(lm, v1alpha1.Tier{Name: "Gold"})
			lm.Spec.DefaultTier = "Gold"
		}, "spec.tiers[0].name in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'"},
		{"tiers without a default", func(lm *v1alpha1.LoopModel) {
			withTiers(lm, v1alpha1.Tier{Name: "gold"})
			lm.Spec.DefaultTier = ""
		}, "defaultTier must be set when tiers are"},
		{"default tier not a tier", func(lm *v1alpha1.LoopModel) {
			withTiers(lm, v1alpha1.Tier{Name: "gold"})
			lm.Spec.DefaultTier = "silver"
		}, "defaultTier must name one of spec.tiers"},
		{"default tier without tiers", func(lm *v1alpha1.LoopModel) { lm.Spec.DefaultTier = "gold" },
			"defaultTier must name one of spec.tiers"},
		{"tier floor above the threshold", func(lm *v1alpha1.LoopModel) {
			withTiers(lm, v1alpha1.Tier{Name: "gold", MinExitThreshold: ptr.To(0.95)})
		}, "a tier's minExitThreshold must be less than or equal to spec.loop.exitThreshold"},
		{"tier floor below the spec's floor", func(lm *v1alpha1.LoopModel) {
			withTiers(lm, v1alpha1.Tier{Name: "batch", MinExitThreshold: ptr.To(0.3)})
		}, "a tier's minExitThreshold must be greater than or equal to spec.loop.minExitThreshold"},
		{"tier floor below an unset spec floor", func(lm *v1alpha1.LoopModel) {
			withTiers(lm, v1alpha1.Tier{Name: "batch", MinExitThreshold: ptr.To(0.6)})
			lm.Spec.Loop.MinExitThreshold = nil
		}, "a tier's minExitThreshold must be greater than or equal to spec.loop.minExitThreshold (spec.loop.exitThreshold when unset)"},
		{"tier floor zero", func(lm *v1alpha1.LoopModel) {
			withTiers(lm, v1alpha1.Tier{Name: "batch", MinExitThreshold: ptr.To(0.0)})
		}, "spec.tiers[0].minExitThreshold in body should be greater than 0"},
		{"tier min depth above max steps", func(lm *v1alpha1.LoopModel) {
			withTiers(lm, v1alpha1.Tier{Name: "gold", MinDepth: ptr.To(5.0)})
		}, "a tier's minDepth must be less than or equal to spec.loop.maxSteps"},
		{"seventeen tiers", func(lm *v1alpha1.LoopModel) {
			var ts []v1alpha1.Tier
			for i := range 17 {
				ts = append(ts, v1alpha1.Tier{Name: fmt.Sprintf("t%d", i)})
			}
			withTiers(lm, ts...)
		}, "spec.tiers: Too many: 17: must have at most 16 items"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lm := newLoopModel(ns, "invalid", "nats://127.0.0.1:4222")
			tt.change(lm)
			err := k8s.Create(context.Background(), lm)
			if !apierrors.IsInvalid(err) {
				t.Fatalf("create error = %v, want Invalid", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("create error = %v\nwant it to contain %q", err, tt.want)
			}
		})
	}
}

// withTiers gives a LoopModel spec.tiers with the first tier as the default, thresholds
// [0.5, 0.9] and 4 loop steps.
func withTiers(lm *v1alpha1.LoopModel, ts ...v1alpha1.Tier) {
	lm.Spec.Loop.MaxSteps, lm.Spec.Loop.ExitThreshold, lm.Spec.Loop.MinExitThreshold = 4, 0.9, ptr.To(0.5)
	lm.Spec.Tiers, lm.Spec.DefaultTier = ts, ts[0].Name
}

// TestTieredLoopModelAccepted: a spec with gold (never lowered), standard and batch tiers is
// accepted as written.
func TestTieredLoopModelAccepted(t *testing.T) {
	ns := newNamespace(t)
	lm := newLoopModel(ns, "tiered", "nats://127.0.0.1:4222")
	withTiers(lm, v1alpha1.Tier{Name: "batch"}, v1alpha1.Tier{Name: "standard", MinExitThreshold: ptr.To(0.7)},
		v1alpha1.Tier{Name: "gold", MinExitThreshold: ptr.To(0.9), MinDepth: ptr.To(3.0)})
	lm.Spec.DefaultTier = "standard"
	if err := k8s.Create(context.Background(), lm); err != nil {
		t.Fatalf("API server refused a valid tiered spec: %v", err)
	}
	got := getLoopModel(t, ns, "tiered").Spec
	if d := cmp.Diff(got.Tiers, lm.Spec.Tiers); d != "" || got.DefaultTier != "standard" {
		t.Errorf("tiers (-got +want):\n%s\ndefault %q", d, got.DefaultTier)
	}
}

// TestSamplesAccepted: every file in config/samples decodes strictly and is accepted by the API
// server, which fills in the documented defaults.
func TestSamplesAccepted(t *testing.T) {
	ns := newNamespace(t)
	files, err := filepath.Glob(filepath.Join("..", "config", "samples", "*.yaml"))
	if err != nil || len(files) < 2 {
		t.Fatalf("samples = %v, %v; want the CPU and GPU samples", files, err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			var lm v1alpha1.LoopModel
			if err := yaml.UnmarshalStrict(b, &lm); err != nil {
				t.Fatalf("decoding %s: %v", f, err)
			}
			lm.Namespace = ns
			if err := k8s.Create(context.Background(), &lm); err != nil {
				t.Fatalf("API server refused %s: %v", f, err)
			}
			got := getLoopModel(t, ns, lm.Name)
			if got.Spec.Tuning.Mode == "" || got.Spec.Model.Format != v1alpha1.FormatHF || got.Spec.Scaling.Replicas == nil {
				t.Errorf("defaults not applied: tuning %+v format %q replicas %v", got.Spec.Tuning, got.Spec.Model.Format, got.Spec.Scaling.Replicas)
			}
		})
	}
}

// TestDefaults: an almost empty LoopModel gets the documented defaults from the API server.
func TestDefaults(t *testing.T) {
	ns := newNamespace(t)
	lm := &v1alpha1.LoopModel{}
	lm.Namespace, lm.Name = ns, "bare"
	lm.Spec.Model.Source.HostPath = &v1alpha1.HostPathSource{Path: "/models"}
	if err := k8s.Create(context.Background(), lm); err != nil {
		t.Fatalf("creating: %v", err)
	}
	got := getLoopModel(t, ns, "bare").Spec
	want := v1alpha1.LoopModelSpec{
		Model: v1alpha1.ModelSpec{Source: lm.Spec.Model.Source, Format: v1alpha1.FormatHF, ContextLength: 2048},
		Loop:  v1alpha1.LoopSpec{MaxSteps: 4, ExitThreshold: 0.9, ProbeFraction: ptr.To(0.02), KVPolicy: v1alpha1.KVFull},
		Scaling: v1alpha1.ScalingSpec{Replicas: ptr.To[int32](1), MinReplicas: 1, MaxReplicas: 1,
			ScaleDownDelay: got.Scaling.ScaleDownDelay},
		Tuning: v1alpha1.TuningSpec{Mode: v1alpha1.TuningOff, Interval: got.Tuning.Interval, MaxStep: ptr.To(0.05)},
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("defaulted spec (-got +want):\n%s", diff)
	}
	if got.Scaling.ScaleDownDelay == nil || got.Scaling.ScaleDownDelay.Duration.String() != "5m0s" ||
		got.Tuning.Interval == nil || got.Tuning.Interval.Duration.String() != "30s" {
		t.Errorf("duration defaults = %v, %v; want 5m and 30s", got.Scaling.ScaleDownDelay, got.Tuning.Interval)
	}
}

// TestPrinterColumns: kubectl get shows Ready, Replicas, Threshold, Mean depth, P95 and Age
// (the API server's Table rendering of the CRD's printer columns).
func TestPrinterColumns(t *testing.T) {
	ctx := context.Background()
	ns := newNamespace(t)
	srv := startNATS(t)
	if err := k8s.Create(ctx, newLoopModel(ns, "shown", srv.url())); err != nil {
		t.Fatal(err)
	}
	await(t, waitLong, "Deployment created", exists(&appsv1.Deployment{}, ns, "shown-worker"))
	markDeploymentReady(t, ns, "shown-worker")
	await(t, waitLong, "Ready", conditionIs(ns, "shown", CondReady, metav1.ConditionTrue, ReasonAvailable))

	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	body, err := cs.CoreV1().RESTClient().Get().AbsPath("/apis/loopserve.io/v1alpha1/namespaces", ns, "loopmodels").
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").DoRaw(ctx)
	if err != nil {
		t.Fatalf("listing as a table: %v", err)
	}
	var table metav1.Table
	if err := json.Unmarshal(body, &table); err != nil {
		t.Fatalf("decoding table: %v", err)
	}
	var cols []string
	for _, c := range table.ColumnDefinitions {
		cols = append(cols, c.Name)
	}
	if diff := cmp.Diff(cols, []string{"Name", "Ready", "Replicas", "Threshold", "Mean depth", "P95", "Age"}); diff != "" {
		t.Errorf("columns (-got +want):\n%s", diff)
	}
	if len(table.Rows) != 1 {
		t.Fatalf("rows = %d, want 1", len(table.Rows))
	}
	cells := table.Rows[0].Cells
	if len(cells) < 4 || cells[0] != "shown" || cells[1] != "True" || cells[2] != float64(1) || cells[3] != 0.9 {
		t.Errorf("row = %v, want shown, True, 1, 0.9, ...", cells)
	}
}
