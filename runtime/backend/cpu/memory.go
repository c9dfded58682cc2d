package cpu

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/loopserve/loopserve/runtime/model"
)

// MemoryLimit is the memory this process may use: the smallest memory.max (cgroup v2) or
// memory.limit_in_bytes (cgroup v1) of its cgroup and the cgroups above it, else the machine's
// MemTotal. It also names where the figure came from.
func MemoryLimit() (int64, string, error) { return memoryLimit("/") }

// memoryLimit is MemoryLimit with /proc and /sys under root (tests give a folder of their own).
func memoryLimit(root string) (int64, string, error) {
	cg, err := os.ReadFile(filepath.Join(root, "proc/self/cgroup"))
	if err == nil {
		var v1, v2 string
		haveV2 := false
		for _, line := range strings.Split(string(cg), "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) != 3 {
				continue
			}
			switch {
			case parts[0] == "0" && parts[1] == "":
				v2, haveV2 = parts[2], true
			case hasController(parts[1], "memory"):
				v1 = parts[2]
			}
		}
		if v1 != "" {
			if n, where, ok := smallestLimit(filepath.Join(root, "sys/fs/cgroup/memory"), v1, "memory.limit_in_bytes"); ok {
				return n, where, nil
			}
		}
		if haveV2 {
			for _, mount := range []string{"sys/fs/cgroup", "sys/fs/cgroup/unified"} {
				if n, where, ok := smallestLimit(filepath.Join(root, mount), v2, "memory.max"); ok {
					return n, where, nil
				}
			}
		}
	}
	mi, err := os.ReadFile(filepath.Join(root, "proc/meminfo"))
	if err != nil {
		return 0, "", fmt.Errorf("reading the memory limit: no cgroup limit and %w", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(mi))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "MemTotal:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				return 0, "", fmt.Errorf("parsing %s: %q: %w", filepath.Join(root, "proc/meminfo"), sc.Text(), err)
			}
			return kb << 10, "MemTotal", nil
		}
	}
	return 0, "", fmt.Errorf("%s has no MemTotal", filepath.Join(root, "proc/meminfo"))
}

func hasController(list, name string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

// smallestLimit reads file in the cgroup folder of path under mount and in each folder above
// it up to mount, returning the smallest limit set ("max" and v1's near-2⁶³ values mean none).
// A path the mount does not show (a container's own cgroup namespace) is read at the mount.
func smallestLimit(mount, path, file string) (int64, string, bool) {
	dir := filepath.Join(mount, filepath.Clean("/"+path))
	if _, err := os.Stat(dir); err != nil {
		dir = mount
	}
	best, where := int64(-1), ""
	for {
		if b, err := os.ReadFile(filepath.Join(dir, file)); err == nil {
			s := strings.TrimSpace(string(b))
			if n, err := strconv.ParseInt(s, 10, 64); err == nil && n > 0 && n < 1<<60 && (best < 0 || n < best) {
				best, where = n, filepath.Join(dir, file)
			}
		}
		if dir == mount || len(dir) <= len(mount) {
			break
		}
		dir = filepath.Dir(dir)
	}
	return best, where, best > 0
}

// weightBytes is the memory m's weights occupy once mapped in.
func weightBytes(m *model.Model) int64 {
	size := func(w *model.Matrix) int64 { return int64(len(w.BF16))*2 + int64(len(w.F32))*4 }
	n := size(&m.Embed)
	if m.LMHead.BF16 == nil || len(m.Embed.BF16) == 0 || &m.LMHead.BF16[0] != &m.Embed.BF16[0] {
		n += size(&m.LMHead)
	}
	for i := range m.Layers {
		L := &m.Layers[i]
		for _, w := range []*model.Matrix{&L.Q, &L.K, &L.V, &L.O, &L.Gate, &L.Up, &L.Down} {
			n += size(w)
		}
	}
	return n
}

// kvCapacity is what a memory limit leaves for KV caches beside weights of the given size:
// the limit less the weights and a headroom for everything else (1 GiB plus 1/16 of it).
func kvCapacity(limit int64, where string, weights int64) (int64, error) {
	head := int64(1<<30) + limit/16
	if c := limit - weights - head; c > 0 {
		return c, nil
	}
	return 0, fmt.Errorf("the memory limit of %d bytes (%s) leaves no room for KV caches beside %d bytes of weights and %d of headroom: raise it or set the KV budget", limit, where, weights, head)
}

// KVCapacity implements engine.KVCapacitor: the process's memory limit (MemoryLimit) less the
// weights and headroom.
func (x *executor) KVCapacity() (int64, error) {
	limit, where, err := MemoryLimit()
	if err != nil {
		return 0, err
	}
	return kvCapacity(limit, where, weightBytes(x.m))
}

var _ interface{ KVCapacity() (int64, error) } = (*executor)(nil)
