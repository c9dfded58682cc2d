package nodeagent

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
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

// mountScript is the shell script a container's mount namespace runs before the program.
//
// Every bind source (and the working directory, when the agent chose it) is first bound into a
// private tmpfs at stage, while every host path is still reachable; the script then changes into
// stage and mounts from there by relative path, so that a volume mounted over a folder (an
// emptyDir at /tmp) cannot hide the sources of the mounts that follow, however the pod nests
// them. When exe is not empty it is opened as fd 3 before any mount and executed as
// /proc/self/fd/3 in place of argv[0], so the agent's binary runs even from under a folder a
// volume covers; the program inherits that read-only descriptor.
//
// Next each shadow's folder is overlaid (its upper layer in the stage) and its submounts put
// back, so that the mount points made below land in the overlay rather than on the host.
//
// Then, per bind, parents before children: create the missing mount point, bind-mount
// (read-only where asked); change to wd (created if missing, as a container runtime does; the
// staged one when stagedWD), exec argv.
type mountScript struct {
	binds    []bind
	stage    string // an existing folder of the agent's, where the tmpfs goes
	wd       string
	stagedWD bool   // wd is the agent's folder: reached through the stage
	exe      string // run this file as argv[0] through a descriptor; "" runs argv[0] as given
	argv     []string
	shadows  []shadow
}

func (m mountScript) String() string {
	var b strings.Builder
	b.WriteString("set -e\n")
	if m.exe != "" {
		fmt.Fprintf(&b, "exec 3< %s\n", shellQuote(m.exe))
	}
	if len(m.binds) > 0 || m.stagedWD || len(m.shadows) > 0 {
		stage := shellQuote(m.stage)
		fmt.Fprintf(&b, "mount -t tmpfs -o mode=0700 loopserve-stage %s\n", stage)
		stageOne := func(name, src string, file bool) {
			at := shellQuote(path.Join(m.stage, name))
			if file {
				fmt.Fprintf(&b, ": > %s\n", at)
			} else {
				fmt.Fprintf(&b, "mkdir %s\n", at)
			}
			fmt.Fprintf(&b, "mount --bind %s %s\n", shellQuote(src), at)
		}
		for i, bd := range m.binds {
			stageOne(strconv.Itoa(i), bd.src, bd.file)
		}
		if m.stagedWD {
			stageOne("wd", m.wd, false)
		}
		fmt.Fprintf(&b, "cd -P %s\n", stage)
	}
	for k, sh := range m.shadows {
		dir := shellQuote(sh.dir)
		for j, sub := range sh.subs {
			at := fmt.Sprintf("./s%d.%d", k, j)
			if sub.file {
				fmt.Fprintf(&b, ": > %s\n", at)
			} else {
				fmt.Fprintf(&b, "mkdir %s\n", at)
			}
			fmt.Fprintf(&b, "mount --no-canonicalize --rbind %s %s\n", shellQuote(sub.path), at)
		}
		o := fmt.Sprintf("./o%d", k)
		fmt.Fprintf(&b, "mkdir %s %s/u %s/w\n", o, o, o)
		fmt.Fprintf(&b, "chmod --reference=%s %s/u\nchown --reference=%s %s/u\n", dir, o, dir, o)
		fmt.Fprintf(&b, "mount --no-canonicalize -t overlay loopserve-shadow -o %s %s\n",
			shellQuote(fmt.Sprintf("lowerdir=%s,upperdir=%s/u,workdir=%s/w", sh.dir, o, o)), dir)
		for j, sub := range sh.subs {
			fmt.Fprintf(&b, "mount --no-canonicalize --rbind ./s%d.%d %s\n", k, j, shellQuote(sub.path))
		}
	}
	for i, bd := range m.binds {
		dst := shellQuote(bd.dst)
		if bd.file {
			fmt.Fprintf(&b, "[ -e %s ] || { mkdir -p %s && : > %s; }\n", dst, shellQuote(path.Dir(bd.dst)), dst)
		} else {
			fmt.Fprintf(&b, "mkdir -p %s\n", dst)
		}
		// --no-canonicalize: mount(8) would otherwise turn ./i into an absolute path, which a
		// mount made above may hide.
		fmt.Fprintf(&b, "mount --no-canonicalize --bind ./%d %s\n", i, dst)
		if bd.readOnly {
			fmt.Fprintf(&b, "mount -o remount,bind,ro %s\n", dst)
		}
	}
	if m.stagedWD {
		b.WriteString("cd -P ./wd\n") // -P: not through $PWD, which a mount may hide
	} else {
		fmt.Fprintf(&b, "mkdir -p %s\ncd %s\n", shellQuote(m.wd), shellQuote(m.wd))
	}
	b.WriteString("exec")
	for i, a := range m.argv {
		if i == 0 && m.exe != "" {
			a = "/proc/self/fd/3"
		}
		b.WriteString(" " + shellQuote(a))
	}
	b.WriteString("\n")
	return b.String()
}

// shellQuote quotes s as one word for sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// shadow is a host folder a container sees through an overlay whose upper layer lies in its
// stage, so that the mount points missing under it are made there and not on the host; the
// mounts under the folder, which the overlay would hide, are put back on top of it.
type shadow struct {
	dir  string  // symlinks resolved
	subs []shsub // the outermost mounts under dir
}

type shsub struct {
	path string
	file bool
}

// shadows lists the host folders to shadow for binds: for each bind outside the others whose
// mount point is missing on the host, its nearest existing ancestor (the outermost of nested
// ones). "/" is never shadowed (its mount points, such as /data, are made on the host). mounts
// are the mount points of the agent's namespace, which the container's copies.
func shadows(binds []bind, mounts []string) []shadow {
	var dirs []string
	for i, b := range binds {
		inside := false
		for _, p := range binds[:i] {
			if under(b.dst, p.dst) {
				inside = true
			}
		}
		if _, err := os.Stat(b.dst); inside || err == nil || !os.IsNotExist(err) {
			continue
		}
		a := path.Dir(b.dst)
		for a != "/" {
			if st, err := os.Stat(a); err == nil && st.IsDir() {
				break
			}
			a = path.Dir(a)
		}
		if r, err := filepath.EvalSymlinks(a); err == nil {
			a = r
		}
		// An overlay's options cannot carry these characters unescaped.
		if a != "/" && !strings.ContainsAny(a, ",:\\ \t\n") && !slices.Contains(dirs, a) {
			dirs = append(dirs, a)
		}
	}
	var out []shadow
	for _, d := range dirs {
		if slices.ContainsFunc(dirs, func(o string) bool { return o != d && under(d, o) }) {
			continue
		}
		s := shadow{dir: d}
		for _, m := range mounts {
			if m == d || !under(m, d) || slices.ContainsFunc(mounts, func(o string) bool { return o != m && o != d && under(o, d) && under(m, o) }) {
				continue
			}
			st, err := os.Stat(m)
			if err != nil || slices.ContainsFunc(s.subs, func(o shsub) bool { return o.path == m }) {
				continue
			}
			s.subs = append(s.subs, shsub{path: m, file: !st.IsDir()})
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b shadow) int { return strings.Compare(a.dir, b.dir) })
	return out
}

// under says whether p is dir or inside it.
func under(p, dir string) bool {
	return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
}

// mountPoints reads the mount points of the calling process's mount namespace.
func mountPoints() ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("reading the mount table: %w", err)
	}
	return parseMountInfo(string(b)), nil
}

// parseMountInfo returns the mount points (the fifth field, its octal escapes decoded) of a
// /proc/<pid>/mountinfo text; malformed lines are skipped.
func parseMountInfo(s string) []string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || !strings.HasPrefix(f[4], "/") {
			continue
		}
		out = append(out, unescapeMount(f[4]))
	}
	return out
}

// unescapeMount decodes the \ooo escapes the kernel writes for space, tab, newline and '\'.
func unescapeMount(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
