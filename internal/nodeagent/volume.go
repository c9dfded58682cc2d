package nodeagent

import (
	"context"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }

// defaultTokenSeconds is the lifetime asked for a projected token that names none.
const defaultTokenSeconds = 3600

// makeVolumes writes every volume of the pod under its folder (claims under Dir/claims) and
// records their host paths. A missing ConfigMap or Secret that is not optional is an error (the
// caller retries, as a kubelet does until it appears).
func (r *podRun) makeVolumes(ctx context.Context) error {
	pod := r.specPod()
	vols := map[string]volume{}
	for _, v := range pod.Spec.Volumes {
		vol, err := r.makeVolume(ctx, pod, v)
		if err != nil {
			return fmt.Errorf("volume %s: %w", v.Name, err)
		}
		vols[v.Name] = vol
	}
	r.mu.Lock()
	r.volumes = vols
	r.mu.Unlock()
	return nil
}

func (r *podRun) makeVolume(ctx context.Context, pod *corev1.Pod, v corev1.Volume) (volume, error) {
	dir := filepath.Join(r.dir, "volumes", v.Name)
	src := v.VolumeSource
	switch {
	case src.EmptyDir != nil:
		return volume{path: dir}, os.MkdirAll(dir, 0o777)
	case src.HostPath != nil:
		return volume{path: src.HostPath.Path}, hostPath(src.HostPath)
	case src.PersistentVolumeClaim != nil:
		claim := filepath.Join(r.prov.opts.Dir, "claims", pod.Namespace, src.PersistentVolumeClaim.ClaimName)
		return volume{path: claim, readOnly: src.PersistentVolumeClaim.ReadOnly}, os.MkdirAll(claim, 0o777)
	case src.ConfigMap != nil, src.Secret != nil, src.DownwardAPI != nil, src.Projected != nil:
		// Written afresh into a new folder, then swapped in, so a retry starts clean.
		tmp := dir + ".new"
		if err := os.RemoveAll(tmp); err != nil {
			return volume{}, err
		}
		if err := os.MkdirAll(tmp, 0o755); err != nil {
			return volume{}, err
		}
		if err := r.writeVolume(ctx, pod, src, tmp); err != nil {
			return volume{}, err
		}
		if err := os.RemoveAll(dir); err != nil {
			return volume{}, err
		}
		return volume{path: dir, readOnly: true}, os.Rename(tmp, dir)
	}
	return volume{}, fmt.Errorf("unsupported volume type (the node agent maps emptyDir, hostPath, persistentVolumeClaim, configMap, secret, downwardAPI and projected volumes)")
}

func hostPath(hp *corev1.HostPathVolumeSource) error {
	t := corev1.HostPathUnset
	if hp.Type != nil {
		t = *hp.Type
	}
	st, err := os.Stat(hp.Path)
	switch t {
	case corev1.HostPathUnset:
		return nil
	case corev1.HostPathDirectoryOrCreate:
		return os.MkdirAll(hp.Path, 0o755)
	case corev1.HostPathFileOrCreate:
		if os.IsNotExist(err) {
			if err := os.MkdirAll(filepath.Dir(hp.Path), 0o755); err != nil {
				return err
			}
			return os.WriteFile(hp.Path, nil, 0o644)
		}
		return err
	case corev1.HostPathDirectory:
		if err == nil && !st.IsDir() {
			return fmt.Errorf("hostPath %s is not a directory", hp.Path)
		}
		return err
	case corev1.HostPathFile:
		if err == nil && !st.Mode().IsRegular() {
			return fmt.Errorf("hostPath %s is not a file", hp.Path)
		}
		return err
	}
	return err // socket, char and block devices: existence only
}

// writeVolume writes a configMap, secret, downwardAPI or projected volume's files into dir.
func (r *podRun) writeVolume(ctx context.Context, pod *corev1.Pod, src corev1.VolumeSource, dir string) error {
	objs := apiObjects{r.prov}
	switch {
	case src.ConfigMap != nil:
		return writeConfigMap(ctx, objs, pod.Namespace, src.ConfigMap.LocalObjectReference, src.ConfigMap.Items, src.ConfigMap.Optional, modeOf(src.ConfigMap.DefaultMode), dir)
	case src.Secret != nil:
		return writeSecret(ctx, objs, pod.Namespace, src.Secret.SecretName, src.Secret.Items, src.Secret.Optional, modeOf(src.Secret.DefaultMode), dir)
	case src.DownwardAPI != nil:
		return writeDownward(pod, src.DownwardAPI.Items, modeOf(src.DownwardAPI.DefaultMode), dir)
	}
	p := src.Projected
	mode := modeOf(p.DefaultMode)
	for _, s := range p.Sources {
		var err error
		switch {
		case s.ConfigMap != nil:
			err = writeConfigMap(ctx, objs, pod.Namespace, s.ConfigMap.LocalObjectReference, s.ConfigMap.Items, s.ConfigMap.Optional, mode, dir)
		case s.Secret != nil:
			err = writeSecret(ctx, objs, pod.Namespace, s.Secret.Name, s.Secret.Items, s.Secret.Optional, mode, dir)
		case s.DownwardAPI != nil:
			err = writeDownward(pod, s.DownwardAPI.Items, mode, dir)
		case s.ServiceAccountToken != nil:
			err = r.writeToken(ctx, pod, s.ServiceAccountToken, mode, dir)
		default:
			err = fmt.Errorf("unsupported projected volume source")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func modeOf(m *int32) fs.FileMode {
	if m == nil {
		return 0o644
	}
	return fs.FileMode(*m) & fs.ModePerm
}

// writeItems writes data's keys (or the items' keys to the items' paths) into dir.
func writeItems(what string, data map[string][]byte, items []corev1.KeyToPath, optional bool, mode fs.FileMode, dir string) error {
	if len(items) == 0 {
		for _, k := range sortedKeys(data) {
			if err := writeVolumeFile(dir, k, data[k], mode); err != nil {
				return err
			}
		}
		return nil
	}
	for _, it := range items {
		b, ok := data[it.Key]
		if !ok {
			if optional {
				continue
			}
			return fmt.Errorf("%s has no key %q", what, it.Key)
		}
		m := mode
		if it.Mode != nil {
			m = modeOf(it.Mode)
		}
		if err := writeVolumeFile(dir, it.Path, b, m); err != nil {
			return err
		}
	}
	return nil
}

func writeConfigMap(ctx context.Context, objs objects, ns string, ref corev1.LocalObjectReference, items []corev1.KeyToPath, optional *bool, mode fs.FileMode, dir string) error {
	cm, err := objs.configMap(ctx, ns, ref.Name)
	if err != nil {
		if apierrors.IsNotFound(err) && isTrue(optional) {
			return nil
		}
		return fmt.Errorf("configmap %s: %w", ref.Name, err)
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	maps.Copy(data, cm.BinaryData)
	return writeItems("configmap "+ref.Name, data, items, isTrue(optional), mode, dir)
}

func writeSecret(ctx context.Context, objs objects, ns, name string, items []corev1.KeyToPath, optional *bool, mode fs.FileMode, dir string) error {
	s, err := objs.secret(ctx, ns, name)
	if err != nil {
		if apierrors.IsNotFound(err) && isTrue(optional) {
			return nil
		}
		return fmt.Errorf("secret %s: %w", name, err)
	}
	return writeItems("secret "+name, s.Data, items, isTrue(optional), mode, dir)
}

func writeDownward(pod *corev1.Pod, items []corev1.DownwardAPIVolumeFile, mode fs.FileMode, dir string) error {
	for _, it := range items {
		var v string
		var err error
		switch {
		case it.FieldRef != nil:
			v, err = fieldValue(pod, it.FieldRef.FieldPath)
		case it.ResourceFieldRef != nil:
			c := containerNamed(pod, it.ResourceFieldRef.ContainerName)
			if c == nil {
				return fmt.Errorf("downwardAPI %s: no container %q", it.Path, it.ResourceFieldRef.ContainerName)
			}
			v, err = resourceValue(c, it.ResourceFieldRef)
		}
		if err != nil {
			return fmt.Errorf("downwardAPI %s: %w", it.Path, err)
		}
		m := mode
		if it.Mode != nil {
			m = modeOf(it.Mode)
		}
		if err := writeVolumeFile(dir, it.Path, []byte(v), m); err != nil {
			return err
		}
	}
	return nil
}

func containerNamed(pod *corev1.Pod, name string) *corev1.Container {
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == name || name == "" && i == 0 {
			return &pod.Spec.Containers[i]
		}
	}
	return nil
}

// writeToken asks the API server for a token of the pod's service account, bound to the pod.
func (r *podRun) writeToken(ctx context.Context, pod *corev1.Pod, src *corev1.ServiceAccountTokenProjection, mode fs.FileMode, dir string) error {
	secs := int64(defaultTokenSeconds)
	if src.ExpirationSeconds != nil {
		secs = *src.ExpirationSeconds
	}
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
		ExpirationSeconds: &secs,
		BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}
	if src.Audience != "" {
		req.Spec.Audiences = []string{src.Audience}
	}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	tok, err := r.prov.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("requesting a token of service account %s: %w", sa, err)
	}
	return writeVolumeFile(dir, src.Path, []byte(tok.Status.Token), mode)
}

// writeVolumeFile writes data at rel (a relative path without '..') under dir.
func writeVolumeFile(dir, rel string, data []byte, mode fs.FileMode) error {
	if err := relativePath(rel); err != nil || rel == "" {
		return fmt.Errorf("volume file path %q: want a relative path without '..'", rel)
	}
	p := filepath.Join(dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		return err
	}
	return os.Chmod(p, mode) // WriteFile's mode passes through the umask
}
