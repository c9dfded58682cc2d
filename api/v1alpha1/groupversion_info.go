// Package v1alpha1 holds the loopserve.io/v1alpha1 API: the LoopModel resource, which declares a
// looped language model's weights, its exit threshold and its depth/latency SLOs, and reports
// the rollout, the threshold in force and the observed depth statistics.
//
// +kubebuilder:object:generate=true
// +groupName=loopserve.io
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is the API group and version of LoopModel.
	GroupVersion = schema.GroupVersion{Group: "loopserve.io", Version: "v1alpha1"}

	// SchemeBuilder registers the types of this package with a runtime.Scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds the types of this package to a runtime.Scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
