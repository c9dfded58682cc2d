package cpu

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeTree writes files (path → content) under a temporary root.
func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, c := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestMemoryLimit(t *testing.T) {
	meminfo := "MemTotal:       24576000 kB\nMemFree:  100 kB\n"
	for _, tc := range []struct {
		name  string
		files map[string]string
		want  int64
		from  string
	}{
		{"v2", map[string]string{
			"proc/self/cgroup":                          "0::/kubepods/pod1/c1\n",
			"sys/fs/cgroup/kubepods/pod1/c1/memory.max": "max\n",
			"sys/fs/cgroup/kubepods/pod1/memory.max":    "8589934592\n",
			"sys/fs/cgroup/kubepods/memory.max":         "17179869184\n",
			"proc/meminfo":                              meminfo,
		}, 8 << 30, "pod1/memory.max"},
		{"v2 namespaced", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"sys/fs/cgroup/memory.max": "4294967296\n",
			"proc/meminfo":             meminfo,
		}, 4 << 30, "sys/fs/cgroup/memory.max"},
		{"v2 hybrid", map[string]string{
			"proc/self/cgroup":                           "4:memory:/\n0::/x\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
			"sys/fs/cgroup/unified/x/memory.max":         "3221225472\n",
			"proc/meminfo":                               meminfo,
		}, 3 << 30, "unified/x/memory.max"},
		{"v1", map[string]string{
			"proc/self/cgroup": "9:name=systemd:/\n4:cpu,memory:/docker/abc\n0::/\n",
			"sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": "2147483648\n",
			"proc/meminfo": meminfo,
		}, 2 << 30, "docker/abc/memory.limit_in_bytes"},
		{"v1 container view", map[string]string{
			"proc/self/cgroup":                           "4:memory:/docker/abc\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes": "1073741824\n",
			"proc/meminfo":                               meminfo,
		}, 1 << 30, "memory/memory.limit_in_bytes"},
		{"unlimited", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"sys/fs/cgroup/memory.max": "max\n",
			"proc/meminfo":             meminfo,
		}, 24576000 << 10, "MemTotal"},
		{"no cgroup file", map[string]string{"proc/meminfo": meminfo}, 24576000 << 10, "MemTotal"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, from, err := memoryLimit(writeTree(t, tc.files))
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want || !strings.HasSuffix(from, tc.from) {
				t.Errorf("limit %d from %q, want %d from …%s", got, from, tc.want, tc.from)
			}
		})
	}
	if _, _, err := memoryLimit(writeTree(t, map[string]string{"proc/meminfo": "garbage\n"})); err == nil {
		t.Error("no limit anywhere: want an error")
	}
}

func TestKVCapacity(t *testing.T) {
	got, err := kvCapacity(16<<30, "test", 3<<30)
	if want := int64(16<<30 - 3<<30 - (1<<30 + 1<<30)); err != nil || got != want {
		t.Errorf("16 GiB limit, 3 GiB weights: %d, %v; want %d", got, err, want)
	}
	if _, err := kvCapacity(2<<30, "memory.max", 1<<30); err == nil || !strings.Contains(err.Error(), "memory.max") {
		t.Errorf("2 GiB limit, 1 GiB weights: %v, want an error naming the limit", err)
	}
}
