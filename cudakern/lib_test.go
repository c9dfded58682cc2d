package cudakern

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestSearchDirs(t *testing.T) {
	env := map[string]string{"LD_LIBRARY_PATH": "/opt/a:/opt/b/::/opt/a", "CUDA_HOME": "/opt/cuda"}
	got := searchDirs(func(k string) string { return env[k] })
	want := append([]string{"/opt/a", "/opt/b", "/opt/cuda/targets/x86_64-linux/lib", "/opt/cuda/lib64"}, defaultDirs...)
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("searchDirs (-got +want):\n%s", diff)
	}
	got = searchDirs(func(string) string { return "" })
	if diff := cmp.Diff(got, defaultDirs); diff != "" {
		t.Errorf("searchDirs without environment (-got +want):\n%s", diff)
	}
	wantDefaults := []string{"/usr/local/cuda/targets/x86_64-linux/lib", "/usr/local/cuda/lib64", "/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64"}
	if diff := cmp.Diff(defaultDirs, wantDefaults); diff != "" {
		t.Errorf("default folders (-got +want):\n%s", diff)
	}
}

func touch(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestCandidatesOrder: folder by folder in search order, newest soname first within a folder,
// only files that exist, then the bare sonames for the loader.
func TestCandidatesOrder(t *testing.T) {
	d1, d2, empty := t.TempDir(), t.TempDir(), t.TempDir()
	touch(t, filepath.Join(d1, "libnvrtc.so.12"), "")
	touch(t, filepath.Join(d2, "libnvrtc.so.11.2"), "")
	touch(t, filepath.Join(d2, "libnvrtc.so.13"), "")
	if err := os.Mkdir(filepath.Join(empty, "libnvrtc.so.13"), 0o755); err != nil { // a folder is not a library
		t.Fatal(err)
	}
	got := candidates(nvrtcNames, []string{empty, d1, d2}, fileExists)
	want := []string{
		filepath.Join(d1, "libnvrtc.so.12"),
		filepath.Join(d2, "libnvrtc.so.13"), filepath.Join(d2, "libnvrtc.so.11.2"),
		"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2",
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("candidates (-got +want):\n%s", diff)
	}
}

// TestOpenLibraryHonoursLDLibraryPath loads the real NVRTC through a fake library folder named
// in LD_LIBRARY_PATH: a broken file earlier in the path is skipped, the folder's link is what
// gets loaded, and the library it loaded answers.
func TestOpenLibraryHonoursLDLibraryPath(t *testing.T) {
	testNVRTC(t)
	real := ""
	for _, d := range searchDirs(os.Getenv) {
		for _, n := range nvrtcNames {
			if p := filepath.Join(d, n); fileExists(p) && real == "" {
				real = p
			}
		}
	}
	if real == "" {
		t.Skip("NVRTC is loadable but not in a folder cudakern searches")
	}
	broken, fake := t.TempDir(), t.TempDir()
	touch(t, filepath.Join(broken, "libnvrtc.so.13"), "not a shared library")
	if err := os.Symlink(real, filepath.Join(fake, "libnvrtc.so.12")); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LD_LIBRARY_PATH", broken+string(os.PathListSeparator)+fake)
	lib, err := openLibrary(nvrtcNames)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(fake, "libnvrtc.so.12"); lib.path != want || lib.soname != "libnvrtc.so.12" {
		t.Errorf("loaded %s (%s), want %s", lib.path, lib.soname, want)
	}
	var version func(major, minor *int32) int32
	b := binder{lib: lib}
	b.bind(&version, "nvrtcVersion")
	if b.err != nil {
		t.Fatal(b.err)
	}
	var major, minor int32
	if res := version(&major, &minor); res != 0 || major < 11 {
		t.Errorf("nvrtcVersion through the fake folder: result %d, version %d.%d", res, major, minor)
	}
	if _, err := lib.symbol("nvrtcNoSuchEntryPoint"); !errors.Is(err, ErrSymbolNotFound) || !strings.Contains(err.Error(), "nvrtcNoSuchEntryPoint") {
		t.Errorf("missing symbol: %v, want ErrSymbolNotFound naming it", err)
	}
}

// TestOpenLibraryReportsBrokenFile: a library found but not loadable is named with dlopen's
// reason in the not-found error.
func TestOpenLibraryReportsBrokenFile(t *testing.T) {
	broken := t.TempDir()
	touch(t, filepath.Join(broken, "libloopserve-test.so.1"), "not a shared library")
	t.Setenv("LD_LIBRARY_PATH", broken)
	_, err := openLibrary([]string{"libloopserve-test.so.1"})
	if !errors.Is(err, ErrLibraryNotFound) {
		t.Fatalf("got %v, want ErrLibraryNotFound", err)
	}
	for _, want := range []string{"libloopserve-test.so.1", filepath.Join(broken, "libloopserve-test.so.1") + ":", "not loadable", broken} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

// TestMissingLibrariesAreNamed: without a GPU stack, each loader fails with ErrLibraryNotFound
// naming its library and where it looked. (On a machine that has a library its loader
// succeeds, and that case is skipped.)
func TestMissingLibrariesAreNamed(t *testing.T) {
	for _, tc := range []struct {
		name string
		load func() error
		want string
	}{
		{"driver", func() error { _, err := loadDriver(driverNames); return err }, "libcuda.so.1"},
		{"cuBLASLt", func() error { _, err := loadBLASLt(cublasLtNames); return err }, "libcublasLt.so.13, libcublasLt.so.12, libcublasLt.so.11"},
		{"none", func() error { _, err := loadNVRTC([]string{"libnvrtc.so.999"}); return err }, "libnvrtc.so.999"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.load()
			if err == nil {
				t.Skipf("%s is installed here", tc.name)
			}
			if !errors.Is(err, ErrLibraryNotFound) {
				t.Fatalf("got %v, want ErrLibraryNotFound", err)
			}
			for _, want := range []string{tc.want, "/usr/local/cuda/targets/x86_64-linux/lib", "library not found"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
		})
	}
}

func TestErrors(t *testing.T) {
	oom := &Error{Call: "cuMemAlloc", Code: 2, Name: cuResultName(2)}
	if got, want := oom.Error(), "cuMemAlloc: CUDA_ERROR_OUT_OF_MEMORY (2)"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	wrapped := errors.Join(errors.New("context"), oom)
	for _, tc := range []struct {
		err    error
		target error
		want   bool
	}{
		{wrapped, ErrOutOfMemory, true},
		{oom, ErrNoDevice, false},
		{&Error{Call: "cuDeviceGet", Code: 100, Name: cuResultName(100)}, ErrNoDevice, true},
		{&Error{Call: "nvrtcCompileProgram", Code: 6, Name: "NVRTC_ERROR_COMPILATION"}, ErrCompile, true},
		{&Error{Call: "cublasLtMatmul", Code: 3, Name: "CUBLAS_STATUS_ALLOC_FAILED"}, ErrOutOfMemory, true},
		{cublasCheck("cublasLtCreate", 3), ErrOutOfMemory, true},
	} {
		if got := errors.Is(tc.err, tc.target); got != tc.want {
			t.Errorf("errors.Is(%v, %v) = %v, want %v", tc.err, tc.target, got, tc.want)
		}
	}
	if got := cuResultName(12345); got != "CUresult(12345)" {
		t.Errorf("unknown result named %q", got)
	}
	if err := cublasCheck("cublasLtMatmul", 0); err != nil {
		t.Errorf("status 0 is success, got %v", err)
	}
}

func TestChooseTarget(t *testing.T) {
	archs := []int{35, 50, 52, 60, 70, 75, 80, 86, 89, 90}
	for _, tc := range []struct {
		cc   int
		want Target
		err  bool
	}{
		{90, Target{Arch: 90, Cubin: true}, false},
		{80, Target{Arch: 80, Cubin: true}, false},
		{87, Target{Arch: 86}, false},  // unknown real arch: PTX of the newest below
		{100, Target{Arch: 90}, false}, // a device newer than NVRTC: PTX the driver compiles
		{30, Target{}, true},
	} {
		got, err := chooseTarget(archs, tc.cc)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("chooseTarget(%d) = %v, %v; want %v (error %v)", tc.cc, got, err, tc.want, tc.err)
		}
		if tc.err && !errors.Is(err, ErrUnsupportedArch) {
			t.Errorf("chooseTarget(%d): %v, want ErrUnsupportedArch", tc.cc, err)
		}
	}
	if got := (Target{Arch: 90, Cubin: true}).String() + " " + (Target{Arch: 80}).String(); got != "sm_90 compute_80" {
		t.Errorf("Target strings %q", got)
	}
}
