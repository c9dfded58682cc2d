// Package v1alpha1 holds the loopserve.io/v1alpha1 API: the LoopModel resource, which declares a
// looped language model's weights, its exit threshold and its depth/latency SLOs, and reports
// the rollout, the threshold in force and the observed depth statistics.
//
// The package depends on the standard library and k8s.io API packages only, so clients can
// import it cheaply.
//
// +kubebuilder:object:generate=true
// +groupName=loopserve.io
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var (
	// GroupVersion is the API group and version of LoopModel.
	GroupVersion = schema.GroupVersion{Group: "loopserve.io", Version: "v1alpha1"}

	// SchemeBuilder registers the types of this package with a runtime.Scheme.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)

	// AddToScheme adds the types of this package to a runtime.Scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &LoopModel{}, &LoopModelList{})
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
