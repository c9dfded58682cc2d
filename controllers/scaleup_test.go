package controllers

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestScaleUpDelay: spec.scaling.scaleUpDelay goes through the API server as written (unset
// stays unset: 0, every scale-up at once), a negative one is refused with a message naming it,
// and policySpec hands it to the tuner.
func TestScaleUpDelay(t *testing.T) {
	ns := newNamespace(t)
	for _, tc := range []struct {
		name    string
		delay   *metav1.Duration
		want    time.Duration
		wantErr string
	}{
		{name: "unset", want: 0},
		{name: "zero", delay: &metav1.Duration{}, want: 0},
		{name: "ninety-seconds", delay: &metav1.Duration{Duration: 90 * time.Second}, want: 90 * time.Second},
		{name: "negative", delay: &metav1.Duration{Duration: -time.Second}, wantErr: "scaleUpDelay must not be negative"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lm := newLoopModel(ns, "up-"+tc.name, "nats://127.0.0.1:4222")
			lm.Spec.Scaling.ScaleUpDelay = tc.delay
			err := k8s.Create(context.Background(), lm)
			if tc.wantErr != "" {
				if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("create error = %v, want Invalid containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("API server refused scaleUpDelay %v: %v", tc.delay, err)
			}
			got := getLoopModel(t, ns, lm.Name)
			if d := cmp.Diff(got.Spec.Scaling.ScaleUpDelay, tc.delay); d != "" {
				t.Errorf("stored scaleUpDelay (-got +want):\n%s", d)
			}
			ps := policySpec(got)
			if ps.ScaleUpDelay != tc.want {
				t.Errorf("policySpec ScaleUpDelay = %v, want %v", ps.ScaleUpDelay, tc.want)
			}
			if err := ps.WithDefaults().Validate(); err != nil {
				t.Errorf("the policy refuses the mapped spec: %v", err)
			}
		})
	}
}
