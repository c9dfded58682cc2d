package nodeagent

import (
	"context"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/utils/ptr"
)

// storedObjects serves ConfigMaps and Secrets from maps, for the environment's rules without
// an API server (the cluster tests cover the API server's answers).
type storedObjects struct {
	configMaps map[string]*corev1.ConfigMap
	secrets    map[string]*corev1.Secret
}

func (s storedObjects) configMap(_ context.Context, _, name string) (*corev1.ConfigMap, error) {
	if cm, ok := s.configMaps[name]; ok {
		return cm, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "configmaps"}, name)
}

func (s storedObjects) secret(_ context.Context, _, name string) (*corev1.Secret, error) {
	if sec, ok := s.secrets[name]; ok {
		return sec, nil
	}
	return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "secrets"}, name)
}

func TestExpand(t *testing.T) {
	vars := map[string]string{"A": "1", "B": "two", "EMPTY": ""}
	lookup := func(k string) (string, bool) { v, ok := vars[k]; return v, ok }
	tests := []struct{ in, want string }{
		{"plain", "plain"},
		{"$(A)", "1"},
		{"x$(A)y$(B)z", "x1ytwoz"},
		{"$(EMPTY)-", "-"},
		{"$(MISSING)", "$(MISSING)"},
		{"$$(A)", "$(A)"},
		{"$$", "$"},
		{"$", "$"},
		{"a$b", "a$b"},
		{"$(A", "$(A"},
		{"$()", "$()"},
		{"$(A)$(A)", "11"},
	}
	for _, tt := range tests {
		if got := expand(tt.in, lookup); got != tt.want {
			t.Errorf("expand(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// FuzzExpand checks that expansion never panics and leaves text without '$' untouched.
func FuzzExpand(f *testing.F) {
	for _, s := range []string{"$(A)", "$$", "$(", "x$(A)$", "$(A)$(B"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got := expand(s, func(k string) (string, bool) { return "v", k == "A" })
		if !strings.Contains(s, "$") && got != s {
			t.Fatalf("expand(%q) = %q, want it unchanged", s, got)
		}
	})
}

func TestResolveEnv(t *testing.T) {
	objs := storedObjects{
		configMaps: map[string]*corev1.ConfigMap{"conf": {Data: map[string]string{"b": "2", "a": "1", "1bad": "x"}}},
		secrets:    map[string]*corev1.Secret{"creds": {Data: map[string][]byte{"pw": []byte("hunter2")}}},
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns", UID: "u-1", Labels: map[string]string{"app": "web"}},
		Spec:       corev1.PodSpec{NodeName: "n1", ServiceAccountName: "sa"},
		Status:     corev1.PodStatus{PodIP: "10.1.2.3", PodIPs: []corev1.PodIP{{IP: "10.1.2.3"}}, HostIP: "10.1.2.1"},
	}
	field := func(p string) *corev1.EnvVarSource {
		return &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: p}}
	}
	c := &corev1.Container{
		EnvFrom: []corev1.EnvFromSource{
			{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "conf"}}},
			{Prefix: "S_", SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}}},
			{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "absent"}, Optional: ptr.To(true)}},
		},
		Env: []corev1.EnvVar{
			{Name: "a", Value: "override"},
			{Name: "X", Value: "$(BASE)/$(a)"},
			{Name: "NAME", ValueFrom: field("metadata.name")},
			{Name: "NS", ValueFrom: field("metadata.namespace")},
			{Name: "UID", ValueFrom: field("metadata.uid")},
			{Name: "APP", ValueFrom: field("metadata.labels['app']")},
			{Name: "NODE", ValueFrom: field("spec.nodeName")},
			{Name: "SA", ValueFrom: field("spec.serviceAccountName")},
			{Name: "IP", ValueFrom: field("status.podIP")},
			{Name: "IPS", ValueFrom: field("status.podIPs")},
			{Name: "HOST", ValueFrom: field("status.hostIP")},
			{Name: "MEM", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "limits.memory", Divisor: resource.MustParse("1Mi")}}},
			{Name: "PW", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}, Key: "pw"}}},
			{Name: "OPT", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "conf"}, Key: "nope", Optional: ptr.To(true)}}},
		},
		Resources: corev1.ResourceRequirements{Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("1536Ki")}},
	}
	got, err := resolveEnv(context.Background(), objs, pod, c, []corev1.EnvVar{{Name: "BASE", Value: "/b"}})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"BASE=/b", "a=override", "b=2", "S_pw=hunter2", "X=/b/override", "NAME=p", "NS=ns", "UID=u-1", "APP=web", "NODE=n1",
		"SA=sa", "IP=10.1.2.3", "IPS=10.1.2.3", "HOST=10.1.2.1", "MEM=2", "PW=hunter2",
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("environment (-got +want):\n%s", diff)
	}
}

func TestResolveEnvRefusesMissingReferences(t *testing.T) {
	objs := storedObjects{configMaps: map[string]*corev1.ConfigMap{"conf": {Data: map[string]string{"a": "1"}}}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns"}}
	tests := []struct {
		name string
		env  corev1.EnvVar
		from []corev1.EnvFromSource
		want string
	}{
		{"missing configmap", corev1.EnvVar{Name: "A", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "gone"}, Key: "a"}}}, nil, `configmap gone: configmaps "gone" not found`},
		{"missing key", corev1.EnvVar{Name: "A", ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "conf"}, Key: "zz"}}}, nil, `configmap conf has no key "zz"`},
		{"missing secret", corev1.EnvVar{Name: "A", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "s"}, Key: "a"}}}, nil, `secret s: secrets "s" not found`},
		{"bad field", corev1.EnvVar{Name: "A", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nope"}}}, nil, `unsupported fieldPath "spec.nope"`},
		{"bad resource", corev1.EnvVar{Name: "A", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{Resource: "cpu"}}}, nil, `unsupported resource "cpu"`},
		{"missing envFrom", corev1.EnvVar{Name: "A", Value: "1"}, []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "gone"}}}}, `envFrom secret gone`},
	}
	for _, tt := range tests {
		c := &corev1.Container{Env: []corev1.EnvVar{tt.env}, EnvFrom: tt.from}
		_, err := resolveEnv(context.Background(), objs, pod, c, nil)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: error %v, want one containing %q", tt.name, err, tt.want)
		}
	}
}

func TestProgramArgv(t *testing.T) {
	env := []string{"PORT=8080", "MODEL=tiny"}
	tests := []struct {
		command, args, want []string
	}{
		{nil, []string{"worker", "--model=$(MODEL)"}, []string{"/bin/loopserve-test", "worker", "--model=tiny"}},
		{[]string{"loopserve", "gateway"}, []string{"--listen=:$(PORT)"}, []string{"/bin/loopserve-test", "gateway", "--listen=:8080"}},
		{[]string{"/usr/local/bin/loopserve"}, []string{"operator"}, []string{"/bin/loopserve-test", "operator"}},
		{[]string{"/bin/sh", "-c", "echo $(PORT)"}, nil, []string{"/bin/sh", "-c", "echo 8080"}},
		{[]string{"loopserve-other"}, nil, []string{"loopserve-other"}},
	}
	for _, tt := range tests {
		got := programArgv("/bin/loopserve-test", &corev1.Container{Command: tt.command, Args: tt.args}, env)
		if diff := cmp.Diff(got, tt.want); diff != "" {
			t.Errorf("command %q args %q (-got +want):\n%s", tt.command, tt.args, diff)
		}
	}
}
