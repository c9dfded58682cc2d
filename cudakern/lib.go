package cudakern

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// The shared libraries cudakern binds, by soname, newest first. A CUDA 13 host usually has
// the toolkit's libraries under /usr/local/cuda/targets/x86_64-linux/lib and the driver's
// libcuda.so.1 in the system folder; Debian's libnvrtc11.2 package installs libnvrtc.so.11.2.
var (
	driverNames   = []string{"libcuda.so.1"}
	nvrtcNames    = []string{"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2"}
	cublasLtNames = []string{"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11"}
)

// defaultDirs are searched after LD_LIBRARY_PATH and $CUDA_HOME, in this order.
var defaultDirs = []string{
	"/usr/local/cuda/targets/x86_64-linux/lib",
	"/usr/local/cuda/lib64",
	"/usr/local/nvidia/lib64", // where the NVIDIA device plugin mounts the driver in a pod
	"/usr/lib/x86_64-linux-gnu",
	"/usr/lib64",
}

// searchDirs lists the folders to look in, in order and without repeats: every entry of
// LD_LIBRARY_PATH (read here, because the loader reads it only when the process starts),
// then $CUDA_HOME's library folders, then defaultDirs.
func searchDirs(getenv func(string) string) []string {
	var dirs []string
	seen := map[string]bool{}
	add := func(d string) {
		if d == "" || seen[d] {
			return
		}
		seen[d] = true
		dirs = append(dirs, d)
	}
	for _, d := range filepath.SplitList(getenv("LD_LIBRARY_PATH")) {
		if d != "" { // the loader reads an empty entry as the working folder; cudakern does not look there
			add(filepath.Clean(d))
		}
	}
	if h := getenv("CUDA_HOME"); h != "" {
		add(filepath.Join(h, "targets", "x86_64-linux", "lib"))
		add(filepath.Join(h, "lib64"))
	}
	for _, d := range defaultDirs {
		add(d)
	}
	return dirs
}

// candidates lists what to hand to dlopen, in order: folder by folder (so a folder earlier in
// LD_LIBRARY_PATH wins over a newer version later), within a folder the newest soname first,
// only files that exist; then the bare sonames, for the loader's own cache and default paths.
func candidates(names, dirs []string, exists func(string) bool) []string {
	var out []string
	for _, d := range dirs {
		for _, n := range names {
			if p := filepath.Join(d, n); exists(p) {
				out = append(out, p)
			}
		}
	}
	return append(out, names...)
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

// library is one loaded shared library. Its symbols stay valid for the life of the process:
// cudakern never unloads a library (the driver's state would not survive it).
type library struct {
	soname string // the name it was found under, e.g. libnvrtc.so.12
	path   string // what dlopen was given
	handle uintptr
}

// openLibrary loads the first candidate of names that dlopen accepts. When none does, the
// error names the library, every soname and folder tried and why each file found failed, and
// wraps ErrLibraryNotFound.
func openLibrary(names []string) (*library, error) {
	dirs := searchDirs(os.Getenv)
	var failed []string
	for _, c := range candidates(names, dirs, fileExists) {
		h, err := dlopen(c)
		if err == nil {
			return &library{soname: filepath.Base(c), path: c, handle: h}, nil
		}
		if strings.ContainsRune(c, '/') { // a bare name that the loader does not know is no news
			failed = append(failed, fmt.Sprintf("%s: %v", c, err))
		}
	}
	msg := fmt.Sprintf("%s (tried %s in %s and the loader's default paths)",
		names[0], strings.Join(names, ", "), strings.Join(dirs, ":"))
	if len(failed) > 0 {
		msg += "; found but not loadable: " + strings.Join(failed, "; ")
	}
	return nil, fmt.Errorf("%s: %w", msg, ErrLibraryNotFound)
}

// symbol resolves the first of names that the library exports (versioned entry points such
// as cuMemAlloc_v2 before their unversioned predecessors).
func (l *library) symbol(names ...string) (uintptr, error) {
	for _, n := range names {
		if p, err := dlsym(l.handle, n); err == nil && p != 0 {
			return p, nil
		}
	}
	return 0, fmt.Errorf("%s (%s): symbol %s: %w", l.soname, l.path, strings.Join(names, " or "), ErrSymbolNotFound)
}

// binder resolves a list of symbols into function pointers, keeping the first error, so a
// binding is a flat list of bind calls followed by one check.
type binder struct {
	lib *library
	err error
}

func (b *binder) bind(fptr any, names ...string) {
	if b.err != nil {
		return
	}
	p, err := b.lib.symbol(names...)
	if err != nil {
		b.err = err
		return
	}
	registerFunc(fptr, p)
}
