package cudakern

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/loopserve/loopserve/runtime/model"
)

// testNVRTC loads the NVRTC library or skips the test with the reason; under CI (CI=true),
// where .ci/run installs Debian's libnvrtc11.2, a missing NVRTC fails it instead.
func testNVRTC(t *testing.T) *NVRTC {
	t.Helper()
	nv, err := LoadNVRTC()
	if err == nil {
		return nv
	}
	if errors.Is(err, ErrLibraryNotFound) && os.Getenv("CI") != "true" {
		t.Skipf("NVRTC is not installed, so the kernels cannot be compiled here (.ci/run installs Debian's libnvrtc11.2): %v", err)
	}
	t.Fatalf("CI must compile the kernels: %v", err)
	return nil
}

// testSpecs are the specs of the repository's models (head widths 32, 16, 128) in the check
// mode (f32 activations and KV) and the serving mode (bf16), plus the mixed modes and the
// widest head the kernels support on the 1.4B shape.
func testSpecs(t *testing.T) []Spec {
	t.Helper()
	var specs []Spec
	for _, dir := range []string{"ouro-tiny-arith", "ouro-tiny-random", "ouro-1.4b-layout"} {
		c, err := model.LoadConfig(filepath.Join("..", "testdata", "models", dir, "config.json"))
		if err != nil {
			t.Fatal(err)
		}
		hd := c.HeadDimOrDefault()
		specs = append(specs, Spec{HeadDim: hd, KVPage: DefaultKVPage},
			Spec{HeadDim: hd, KVPage: DefaultKVPage, ActBF16: true, KVBF16: true})
		if dir == "ouro-1.4b-layout" {
			specs = append(specs, Spec{HeadDim: hd, KVPage: DefaultKVPage, KVBF16: true})
		}
	}
	return append(specs, Spec{HeadDim: 256, KVPage: 64, ActBF16: true, KVBF16: true})
}

// TestKernelsCompile compiles every embedded kernel unit for sm_80 and sm_90 for each test
// spec through cudakern's own NVRTC binding (Build), and fails on any error or warning (a
// non-empty log). Each cubin must be a CUDA ELF for its architecture defining every kernel of
// the unit's table.
func TestKernelsCompile(t *testing.T) {
	nv := testNVRTC(t)
	major, minor := nv.Version()
	start := time.Now()
	kernels, images := 0, 0
	for _, arch := range []int{80, 90} {
		target, err := nv.Target(arch)
		if err != nil {
			t.Fatal(err)
		}
		if !target.Cubin {
			t.Fatalf("NVRTC %d.%d cannot build cubins for sm_%d (knows %v)", major, minor, arch, nv.SupportedArchs())
		}
		for _, spec := range testSpecs(t) {
			imgs, err := Build(context.Background(), nv, nil, spec, target)
			if err != nil {
				t.Fatalf("%s, %s: %v", target, spec, err)
			}
			for k, img := range imgs {
				u := Units()[k]
				if img.Log != "" {
					t.Errorf("%s for %s, %s: NVRTC warned:\n%s", u.Name, target, spec, img.Log)
				}
				syms, err := cubinKernels(img.Data, arch)
				if err != nil {
					t.Errorf("%s for %s, %s: %v", u.Name, target, spec, err)
					continue
				}
				var want []string
				for _, k := range u.Kernels {
					want = append(want, k.Name)
				}
				slices.Sort(want)
				if diff := cmp.Diff(syms, want); diff != "" {
					t.Errorf("%s for %s: kernels in the cubin (-got +want):\n%s", u.Name, target, diff)
				}
				kernels += len(u.Kernels)
				images++
			}
		}
	}
	t.Logf("NVRTC %d.%d (%s): %d kernels in %d cubins (%d units × %d specs × sm_80, sm_90) in %v",
		major, minor, nv.Path(), kernels, images, len(Units()), len(testSpecs(t)), time.Since(start).Round(time.Millisecond))
}

// cubinKernels checks that img is a 64-bit little-endian CUDA ELF (EM_CUDA) for sm_arch and
// returns its global function symbols, sorted. (The standard library's debug/elf refuses
// cubins: their e_version is the CUDA ABI version, not 1.)
func cubinKernels(img []byte, arch int) ([]string, error) {
	le := binary.LittleEndian
	if len(img) < 64 || string(img[:4]) != "\x7fELF" || img[4] != 2 || img[5] != 1 {
		return nil, fmt.Errorf("not a 64-bit little-endian ELF")
	}
	if m := le.Uint16(img[18:]); m != 190 {
		return nil, fmt.Errorf("ELF machine %d, want 190 (EM_CUDA)", m)
	}
	if fl := le.Uint32(img[48:]); int(fl&0xff) != arch && int(fl>>8&0xff) != arch {
		return nil, fmt.Errorf("ELF flags %#x do not name sm_%d", fl, arch)
	}
	shoff, shentsize, shnum := le.Uint64(img[40:]), int(le.Uint16(img[58:])), int(le.Uint16(img[60:]))
	section := func(i int) (typ uint32, off, size uint64, link uint32, err error) {
		at := shoff + uint64(i*shentsize)
		if at+64 > uint64(len(img)) {
			return 0, 0, 0, 0, fmt.Errorf("section %d outside the file", i)
		}
		h := img[at:]
		typ, off, size, link = le.Uint32(h[4:]), le.Uint64(h[24:]), le.Uint64(h[32:]), le.Uint32(h[40:])
		if off+size > uint64(len(img)) && typ != 8 { // SHT_NOBITS has no bytes in the file
			return 0, 0, 0, 0, fmt.Errorf("section %d data outside the file", i)
		}
		return typ, off, size, link, nil
	}
	var names []string
	for i := range shnum {
		typ, off, size, link, err := section(i)
		if err != nil {
			return nil, err
		}
		if typ != 2 { // SHT_SYMTAB
			continue
		}
		_, stroff, strsize, _, err := section(int(link))
		if err != nil {
			return nil, err
		}
		strtab := img[stroff : stroff+strsize]
		for s := off; s+24 <= off+size; s += 24 {
			sym := img[s:]
			nameOff, info := le.Uint32(sym), sym[4]
			if info&0xf != 2 || info>>4 != 1 || int(nameOff) >= len(strtab) { // STT_FUNC, STB_GLOBAL
				continue
			}
			name := strtab[nameOff:]
			if n := slices.Index(name, 0); n >= 0 {
				name = name[:n]
			}
			names = append(names, string(name))
		}
	}
	slices.Sort(names)
	return names, nil
}

var (
	ptxEntry = regexp.MustCompile(`\.visible\s+\.entry\s+(\w+)\s*\(([^)]*)\)`)
	ptxParam = regexp.MustCompile(`\.param\s+\.(\w+)`)
)

// ptxSignatures parses the kernels' parameter types out of PTX: 64-bit parameters are
// pointers (no kernel takes a 64-bit integer), 32-bit integers Int, f32 Float.
func ptxSignatures(ptx string) (map[string][]ParamKind, error) {
	out := map[string][]ParamKind{}
	for _, m := range ptxEntry.FindAllStringSubmatch(ptx, -1) {
		var kinds []ParamKind
		for _, p := range ptxParam.FindAllStringSubmatch(m[2], -1) {
			switch p[1] {
			case "u64", "b64", "s64":
				kinds = append(kinds, Ptr)
			case "u32", "s32", "b32":
				kinds = append(kinds, Int)
			case "f32":
				kinds = append(kinds, Float)
			default:
				return nil, fmt.Errorf("kernel %s: parameter type .%s", m[1], p[1])
			}
		}
		out[m[1]] = kinds
	}
	return out, nil
}

// TestKernelSignatures checks the host's kernel table, which every launch fills arguments
// from, against what NVRTC compiled: the same kernels in each unit, with the same parameter
// types in the same order, in both numeric modes.
func TestKernelSignatures(t *testing.T) {
	nv := testNVRTC(t)
	target := Target{Arch: 80}
	for _, spec := range []Spec{{HeadDim: 128, KVPage: 16}, {HeadDim: 64, KVPage: 32, ActBF16: true, KVBF16: true}} {
		for _, u := range Units() {
			c, err := nv.Compile(u.Name, u.Source, Headers(), target, spec.Options())
			if err != nil {
				t.Fatal(err)
			}
			got, err := ptxSignatures(string(c.Image))
			if err != nil {
				t.Fatalf("%s: %v", u.Name, err)
			}
			want := map[string][]ParamKind{}
			for _, k := range u.Kernels {
				want[k.Name] = k.kinds()
			}
			if diff := cmp.Diff(got, want); diff != "" {
				t.Errorf("%s (%s): compiled kernels vs the table (-got +want):\n%s", u.Name, spec, diff)
			}
		}
	}
}

var ptxasReport = regexp.MustCompile(`Function properties for (\w+)\s+ptxas\s+\.\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads`)

// TestKernelsDoNotSpill compiles the widest serving and check specs for sm_90 with ptxas's
// resource report and fails when a kernel spills registers or needs a stack frame. rope_kv
// may have one: the float64 sine and cosine of positions past the host's table carry a slow
// path for huge arguments.
func TestKernelsDoNotSpill(t *testing.T) {
	nv := testNVRTC(t)
	stackOK := map[string]bool{"rope_kv": true}
	for _, spec := range []Spec{{HeadDim: 128, KVPage: 16, ActBF16: true, KVBF16: true}, {HeadDim: 256, KVPage: 16}} {
		for _, u := range Units() {
			c, err := nv.Compile(u.Name, u.Source, Headers(), Target{Arch: 90, Cubin: true}, append(spec.Options(), "--ptxas-options=-v"))
			if err != nil {
				t.Fatal(err)
			}
			seen := map[string]bool{}
			for _, m := range ptxasReport.FindAllStringSubmatch(c.Log, -1) {
				seen[m[1]] = true
				if m[3] != "0" || m[4] != "0" || (m[2] != "0" && !stackOK[m[1]]) {
					t.Errorf("%s (%s): %s: %s bytes stack frame, %s bytes spill stores, %s bytes spill loads", u.Name, spec, m[1], m[2], m[3], m[4])
				}
			}
			for _, k := range u.Kernels {
				if !seen[k.Name] {
					t.Errorf("%s: no resource report for %s in:\n%s", u.Name, k.Name, c.Log)
				}
			}
		}
	}
}

// TestKernelsIncludeNoToolkitHeaders: the units include only cudakern's in-memory headers, so
// NVRTC needs no include path and CI no CUDA toolkit.
func TestKernelsIncludeNoToolkitHeaders(t *testing.T) {
	inc := regexp.MustCompile(`(?m)^\s*#\s*include\s*(\S+)`)
	for _, u := range append(Units(), Unit{Name: "common.cuh", Source: Headers()[0].Source}) {
		for _, m := range inc.FindAllStringSubmatch(u.Source, -1) {
			name := strings.Trim(m[1], `"`)
			if !strings.HasPrefix(m[1], `"`) || !slices.Contains(headerNames, name) {
				t.Errorf("%s includes %s; only %v are provided", u.Name, m[1], headerNames)
			}
		}
	}
}

func TestCompileErrorCarriesLog(t *testing.T) {
	nv := testNVRTC(t)
	_, err := nv.Compile("broken.cu", "extern \"C\" __global__ void k(float* o) { o[0] = undefined_name; }", nil, Target{Arch: 80, Cubin: true}, nil)
	if !errors.Is(err, ErrCompile) {
		t.Fatalf("got %v, want ErrCompile", err)
	}
	for _, want := range []string{"broken.cu", "undefined_name", "sm_80", "NVRTC_ERROR_COMPILATION"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

// TestCompileWarningIsLogged: a source that compiles with a warning returns it in the log,
// which is what TestKernelsCompile holds empty.
func TestCompileWarningIsLogged(t *testing.T) {
	nv := testNVRTC(t)
	c, err := nv.Compile("warn.cu", "extern \"C\" __global__ void k(float* o) { int unused; o[0] = 1.f; }", nil, Target{Arch: 80, Cubin: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(c.Log, "unused") {
		t.Errorf("log %q does not report the unused variable", c.Log)
	}
}

func TestSpecValidate(t *testing.T) {
	for _, tc := range []struct {
		s  Spec
		ok bool
	}{
		{Spec{HeadDim: 128, KVPage: 16}, true},
		{Spec{HeadDim: 2, KVPage: 1}, true},
		{Spec{HeadDim: 256, KVPage: 1024}, true},
		{Spec{HeadDim: 0, KVPage: 16}, false},
		{Spec{HeadDim: 127, KVPage: 16}, false},
		{Spec{HeadDim: 258, KVPage: 16}, false},
		{Spec{HeadDim: 64, KVPage: 0}, false},
		{Spec{HeadDim: 64, KVPage: 24}, false},
		{Spec{HeadDim: 64, KVPage: 2048}, false},
	} {
		if err := tc.s.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: Validate() = %v, want ok %v", tc.s, err, tc.ok)
		}
	}
	got := Spec{HeadDim: 128, KVPage: 16, ActBF16: true}.Options()
	want := []string{"-std=c++17", "-DLS_HEAD_DIM=128", "-DLS_KV_PAGE=16", "-DLS_ACT_BF16=1", "-DLS_KV_BF16=0"}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("Options (-got +want):\n%s", diff)
	}
}
