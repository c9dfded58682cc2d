package nodeagent

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
)

func TestContainerMounts(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "conf")
	if err := os.MkdirAll(filepath.Join(conf, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(conf, "file"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	vols := map[string]volume{"conf": {path: conf, readOnly: true}, "data": {path: dir}}
	c := &corev1.Container{Name: "c", VolumeMounts: []corev1.VolumeMount{
		{Name: "data", MountPath: "/srv/data/"},
		{Name: "conf", MountPath: "/etc/app/one", SubPath: "file"},
		{Name: "conf", MountPath: "/srv"},
	}, TerminationMessagePath: "/tmp/msg"}
	got, err := containerMounts(c, vols, "/t/log")
	if err != nil {
		t.Fatal(err)
	}
	want := []bind{
		{src: conf, dst: "/srv", readOnly: true},
		{src: dir, dst: "/srv/data"},
		{src: "/t/log", dst: "/tmp/msg", file: true},
		{src: filepath.Join(conf, "file"), dst: "/etc/app/one", readOnly: true, file: true},
	}
	if diff := cmp.Diff(got, want, cmp.AllowUnexported(bind{})); diff != "" {
		t.Errorf("binds (-got +want):\n%s", diff)
	}

	bad := []struct {
		vm   corev1.VolumeMount
		want string
	}{
		{corev1.VolumeMount{Name: "nope", MountPath: "/x"}, `mounts volume "nope", which the pod does not define`},
		{corev1.VolumeMount{Name: "conf", MountPath: "rel"}, `mountPath "rel" is not absolute`},
		{corev1.VolumeMount{Name: "conf", MountPath: "/x", SubPath: "../../etc"}, `contains '..'`},
		{corev1.VolumeMount{Name: "conf", MountPath: "/x", SubPath: "/etc"}, `is absolute`},
	}
	for _, tt := range bad {
		_, err := containerMounts(&corev1.Container{Name: "c", VolumeMounts: []corev1.VolumeMount{tt.vm}}, vols, "/t/log")
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("mount %+v: error %v, want one containing %q", tt.vm, err, tt.want)
		}
	}
}

// TestMountScriptQuotes runs the script's exec line through sh: arguments with quotes, spaces
// and $ reach the program unchanged.
func TestMountScriptQuotes(t *testing.T) {
	wd := t.TempDir()
	args := []string{"printf", "%s|", "it's", "a b", "$HOME", `"q"`, ""}
	script := mountScript{wd: wd, argv: args}.String()
	out, err := exec.Command("/bin/sh", "-c", script, "sh").Output()
	if err != nil {
		t.Fatalf("%v\n%s", err, script)
	}
	if got, want := string(out), `it's|a b|$HOME|"q"||`; got != want {
		t.Errorf("printed %q, want %q", got, want)
	}
}

func TestWriteVolumeFileRefusesEscapes(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"../x", "a/../../x", "/etc/passwd", ""} {
		if err := writeVolumeFile(dir, p, []byte("x"), 0o644); err == nil {
			t.Errorf("writeVolumeFile(%q) succeeded, want an error", p)
		}
	}
	if err := writeVolumeFile(dir, "a/b.txt", []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, "a", "b.txt"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("a/b.txt: %v, mode %v; want 0600", err, st.Mode().Perm())
	}
}

// TestMountScriptCoveredSources runs a script whose first mount covers the folder holding every
// other source, the working directory and the binary (as an emptyDir on /tmp covers Options.Dir
// under /tmp): the later mounts, the working directory and the binary are still reached.
func TestMountScriptCoveredSources(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("unshare(1) not found")
	}
	root := t.TempDir()
	at := func(p string) string { return filepath.Join(root, p) }
	for _, d := range []string{"cover", "src/dir", "wd", "stage", "bin"} {
		if err := os.MkdirAll(at(d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for p, body := range map[string]string{"src/dir/f": "from a folder\n", "src/file": "from a file\n", "wd/marker": "in the working directory\n"} {
		if err := os.WriteFile(at(p), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	shell, err := os.ReadFile("/bin/sh")
	if err != nil {
		t.Fatal(err)
	}
	exe := at("bin/sh")
	if err := os.WriteFile(exe, shell, 0o755); err != nil {
		t.Fatal(err)
	}
	s := mountScript{
		binds: []bind{
			{src: at("cover"), dst: root},
			{src: at("src/dir"), dst: at("x"), readOnly: true},
			{src: at("src/file"), dst: at("y"), file: true},
		},
		stage: at("stage"), wd: at("wd"), stagedWD: true, exe: exe,
		argv: []string{exe, "-c", `cat ./marker "$1/x/f" "$1/y"; if (: > "$1/x/new") 2>/dev/null; then echo x is writable; fi`, "sh", root},
	}
	out, err := exec.Command(unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", s.String(), "sh").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s\nscript:\n%s", err, out, s)
	}
	if diff := cmp.Diff(string(out), "in the working directory\nfrom a folder\nfrom a file\n"); diff != "" {
		t.Errorf("output (-got +want):\n%s\nscript:\n%s", diff, s)
	}
	if _, err := os.Stat(at("src/dir/new")); err == nil {
		t.Error("the read-only mount was written through")
	}
}

// TestMountScriptShadows: mount points missing under an existing host folder are made in an
// overlay of it, not on the host; the folder's files, mode and submounts stay visible.
func TestMountScriptShadows(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("unshare(1) not found")
	}
	root := t.TempDir()
	at := func(p string) string { return filepath.Join(root, p) }
	for _, d := range []string{"host/sub", "src/dir", "stage", "wd"} {
		if err := os.MkdirAll(at(d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(at("host"), 0o751); err != nil {
		t.Fatal(err)
	}
	for p, body := range map[string]string{"host/keep": "kept\n", "src/dir/f": "from a folder\n", "src/file": "from a file\n"} {
		if err := os.WriteFile(at(p), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	binds := []bind{
		{src: at("src/dir"), dst: at("host/newdir")},
		{src: at("src/file"), dst: at("host/new/deep/file"), file: true},
		{src: at("src/dir"), dst: at("host/newdir/inner")}, // inside a volume: not shadowed
	}
	sh := shadows(binds, []string{"/", root, at("host/sub"), at("host/sub/nested"), at("elsewhere")})
	if diff := cmp.Diff(sh, []shadow{{dir: at("host"), subs: []shsub{{path: at("host/sub")}}}}, cmp.AllowUnexported(shadow{}, shsub{})); diff != "" {
		t.Fatalf("shadows (-got +want):\n%s", diff)
	}
	s := mountScript{binds: binds, stage: at("stage"), wd: at("wd"), shadows: sh, argv: []string{"/bin/sh", "-c",
		`cat "$1/keep" "$1/sub/f" "$1/newdir/f" "$1/new/deep/file" "$1/newdir/inner/f"; stat -c %a "$1"`, "sh", at("host")}}
	// The submount exists in the container's namespace only, as /dev/pts does under /dev.
	prefix := "set -e; mount -t tmpfs sub " + shellQuote(at("host/sub")) + "; echo in the submount > " + shellQuote(at("host/sub/f")) + "\n"
	out, err := exec.Command(unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", prefix+s.String(), "sh").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s\nscript:\n%s", err, out, s)
	}
	want := "kept\nin the submount\nfrom a folder\nfrom a file\nfrom a folder\n751\n"
	if diff := cmp.Diff(string(out), want); diff != "" {
		t.Errorf("output (-got +want):\n%s\nscript:\n%s", diff, s)
	}
	for _, p := range []string{"host/newdir", "host/new"} {
		if _, err := os.Lstat(at(p)); err == nil {
			t.Errorf("the mount point %s was made on the host", p)
		}
	}
}

func TestParseMountInfo(t *testing.T) {
	in := `22 28 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw
98 28 0:45 / /mnt/with\040space\011tab rw - tmpfs tmpfs rw
99 28 0:46 / /back\134slash rw - tmpfs tmpfs rw
short line
100 28 0:47 / relative rw - tmpfs tmpfs rw
`
	got := parseMountInfo(in)
	want := []string{"/sys", "/mnt/with space\ttab", `/back\slash`}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("mount points (-got +want):\n%s", diff)
	}
}

func FuzzParseMountInfo(f *testing.F) {
	f.Add("22 28 0:21 / /sys rw - sysfs sysfs rw\n")
	f.Add(`1 2 3 4 /a\0`)
	f.Fuzz(func(t *testing.T, s string) {
		for _, p := range parseMountInfo(s) {
			if !strings.HasPrefix(p, "/") {
				t.Errorf("mount point %q is not absolute", p)
			}
		}
	})
}
