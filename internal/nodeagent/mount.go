package nodeagent

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// DefaultTerminationMessagePath is where a container writes its termination message unless
// its spec names another path.
const DefaultTerminationMessagePath = corev1.TerminationMessagePathDefault

// volume is a pod volume as a host path.
type volume struct {
	path     string
	readOnly bool // configMap, secret, downwardAPI and projected volumes are read-only
}

// bind is one bind mount of a container: host path src onto dst.
type bind struct {
	src, dst string
	readOnly bool
	file     bool // src is a file: dst is created as an empty file if missing
}

// containerMounts maps a container's volume mounts and termination-message path to bind
// mounts, parents before children.
func containerMounts(c *corev1.Container, vols map[string]volume, termLog string) ([]bind, error) {
	var binds []bind
	for _, vm := range c.VolumeMounts {
		v, ok := vols[vm.Name]
		if !ok {
			return nil, fmt.Errorf("container %s mounts volume %q, which the pod does not define", c.Name, vm.Name)
		}
		if !path.IsAbs(vm.MountPath) {
			return nil, fmt.Errorf("container %s: mountPath %q is not absolute", c.Name, vm.MountPath)
		}
		src := v.path
		if sp := vm.SubPath; sp != "" {
			if err := relativePath(sp); err != nil {
				return nil, fmt.Errorf("container %s: subPath of volume %s: %w", c.Name, vm.Name, err)
			}
			src = filepath.Join(src, sp)
			if _, err := os.Stat(src); os.IsNotExist(err) {
				if err := os.MkdirAll(src, 0o755); err != nil {
					return nil, fmt.Errorf("creating subPath %s: %w", src, err)
				}
			}
		}
		st, err := os.Stat(src)
		if err != nil {
			return nil, fmt.Errorf("container %s: volume %s: %w", c.Name, vm.Name, err)
		}
		binds = append(binds, bind{src: src, dst: path.Clean(vm.MountPath), readOnly: vm.ReadOnly || v.readOnly, file: !st.IsDir()})
	}
	dst := c.TerminationMessagePath
	if dst == "" {
		dst = DefaultTerminationMessagePath
	}
	if !path.IsAbs(dst) {
		return nil, fmt.Errorf("container %s: terminationMessagePath %q is not absolute", c.Name, dst)
	}
	binds = append(binds, bind{src: termLog, dst: path.Clean(dst), file: true})
	slices.SortStableFunc(binds, func(a, b bind) int { return strings.Count(a.dst, "/") - strings.Count(b.dst, "/") })
	return binds, nil
}

// relativePath refuses a path that is absolute or climbs out of its folder.
func relativePath(p string) error {
	if path.IsAbs(p) {
		return fmt.Errorf("%q is absolute", p)
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return fmt.Errorf("%q contains '..'", p)
		}
	}
	return nil
}

// mountScript is the shell script a container's mount namespace runs before the program:
// create missing mount points, bind-mount (read-only where asked), change to wd (created if
// missing, as a container runtime does), exec argv.
func mountScript(binds []bind, wd string, argv []string) string {
	var b strings.Builder
	b.WriteString("set -e\n")
	for _, m := range binds {
		dst := shellQuote(m.dst)
		if m.file {
			fmt.Fprintf(&b, "[ -e %s ] || { mkdir -p %s && : > %s; }\n", dst, shellQuote(path.Dir(m.dst)), dst)
		} else {
			fmt.Fprintf(&b, "mkdir -p %s\n", dst)
		}
		fmt.Fprintf(&b, "mount --bind %s %s\n", shellQuote(m.src), dst)
		if m.readOnly {
			fmt.Fprintf(&b, "mount -o remount,bind,ro %s\n", dst)
		}
	}
	fmt.Fprintf(&b, "mkdir -p %s\ncd %s\n", shellQuote(wd), shellQuote(wd))
	b.WriteString("exec")
	for _, a := range argv {
		b.WriteString(" " + shellQuote(a))
	}
	b.WriteString("\n")
	return b.String()
}

// shellQuote quotes s as one word for sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
