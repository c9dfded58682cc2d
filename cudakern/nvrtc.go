package cudakern

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// NVRTC is the runtime compiler (libnvrtc), bound through purego. It needs no GPU: CI uses it
// to compile every kernel. Safe for concurrent use (each Compile has its own program).
type NVRTC struct {
	lib          *library
	major, minor int
	archs        []int // SM versions it can generate code for, ascending (e.g. 52 ... 90)

	nvrtcVersion              func(major, minor *int32) int32
	nvrtcGetErrorString       func(res int32) *byte
	nvrtcCreateProgram        func(prog *uintptr, src, name string, numHeaders int32, headers, includeNames **byte) int32
	nvrtcDestroyProgram       func(prog *uintptr) int32
	nvrtcCompileProgram       func(prog uintptr, numOptions int32, options **byte) int32
	nvrtcGetProgramLogSize    func(prog uintptr, size *uintptr) int32
	nvrtcGetProgramLog        func(prog uintptr, log *byte) int32
	nvrtcGetPTXSize           func(prog uintptr, size *uintptr) int32
	nvrtcGetPTX               func(prog uintptr, ptx *byte) int32
	nvrtcGetCUBINSize         func(prog uintptr, size *uintptr) int32
	nvrtcGetCUBIN             func(prog uintptr, cubin *byte) int32
	nvrtcGetNumSupportedArchs func(n *int32) int32
	nvrtcGetSupportedArchs    func(archs *int32) int32
}

var (
	nvrtcOnce sync.Once
	nvrtcLib  *NVRTC
	nvrtcErr  error
)

// LoadNVRTC loads libnvrtc (libnvrtc.so.13, .12 or .11.2, see the package doc for where it is
// looked for) once per process. A missing library is an error wrapping ErrLibraryNotFound.
func LoadNVRTC() (*NVRTC, error) {
	nvrtcOnce.Do(func() { nvrtcLib, nvrtcErr = loadNVRTC(nvrtcNames) })
	return nvrtcLib, nvrtcErr
}

func loadNVRTC(names []string) (*NVRTC, error) {
	lib, err := openLibrary(names)
	if err != nil {
		return nil, fmt.Errorf("loading NVRTC: %w", err)
	}
	n := &NVRTC{lib: lib}
	b := binder{lib: lib}
	b.bind(&n.nvrtcVersion, "nvrtcVersion")
	b.bind(&n.nvrtcGetErrorString, "nvrtcGetErrorString")
	b.bind(&n.nvrtcCreateProgram, "nvrtcCreateProgram")
	b.bind(&n.nvrtcDestroyProgram, "nvrtcDestroyProgram")
	b.bind(&n.nvrtcCompileProgram, "nvrtcCompileProgram")
	b.bind(&n.nvrtcGetProgramLogSize, "nvrtcGetProgramLogSize")
	b.bind(&n.nvrtcGetProgramLog, "nvrtcGetProgramLog")
	b.bind(&n.nvrtcGetPTXSize, "nvrtcGetPTXSize")
	b.bind(&n.nvrtcGetPTX, "nvrtcGetPTX")
	b.bind(&n.nvrtcGetCUBINSize, "nvrtcGetCUBINSize") // NVRTC 11.1+
	b.bind(&n.nvrtcGetCUBIN, "nvrtcGetCUBIN")
	b.bind(&n.nvrtcGetNumSupportedArchs, "nvrtcGetNumSupportedArchs") // NVRTC 11.2+
	b.bind(&n.nvrtcGetSupportedArchs, "nvrtcGetSupportedArchs")
	if b.err != nil {
		return nil, fmt.Errorf("loading NVRTC: %w", b.err)
	}
	var major, minor int32
	if err := n.check("nvrtcVersion", n.nvrtcVersion(&major, &minor)); err != nil {
		return nil, err
	}
	n.major, n.minor = int(major), int(minor)
	var count int32
	if err := n.check("nvrtcGetNumSupportedArchs", n.nvrtcGetNumSupportedArchs(&count)); err != nil {
		return nil, err
	}
	if count > 0 {
		archs := make([]int32, count)
		if err := n.check("nvrtcGetSupportedArchs", n.nvrtcGetSupportedArchs(&archs[0])); err != nil {
			return nil, err
		}
		for _, a := range archs {
			n.archs = append(n.archs, int(a))
		}
		slices.Sort(n.archs)
	}
	return n, nil
}

// Version is NVRTC's CUDA version, e.g. (11, 8).
func (n *NVRTC) Version() (major, minor int) { return n.major, n.minor }

// Path is the file the library was loaded from (or its soname, when the loader found it).
func (n *NVRTC) Path() string { return n.lib.path }

// SupportedArchs lists the SM versions NVRTC can generate code for, ascending (e.g. 90 for
// sm_90).
func (n *NVRTC) SupportedArchs() []int { return slices.Clone(n.archs) }

// Target picks what to build for a device of compute capability cc (major·10 + minor): a
// cubin for sm_cc when NVRTC knows the architecture, else PTX for the newest virtual
// architecture it knows below cc, which the driver compiles when it loads the module (a
// device newer than the NVRTC library).
func (n *NVRTC) Target(cc int) (Target, error) { return chooseTarget(n.archs, cc) }

// Target is an NVRTC code-generation target.
type Target struct {
	Arch  int  // SM version, e.g. 90
	Cubin bool // true: a cubin for sm_Arch (real architecture); false: PTX for compute_Arch
}

func (t Target) String() string {
	if t.Cubin {
		return fmt.Sprintf("sm_%d", t.Arch)
	}
	return fmt.Sprintf("compute_%d", t.Arch)
}

func chooseTarget(supported []int, cc int) (Target, error) {
	if slices.Contains(supported, cc) {
		return Target{Arch: cc, Cubin: true}, nil
	}
	best := -1
	for _, a := range supported {
		if a <= cc && a > best {
			best = a
		}
	}
	if best < 0 {
		return Target{}, fmt.Errorf("compute capability %d.%d (NVRTC knows %v): %w", cc/10, cc%10, supported, ErrUnsupportedArch)
	}
	return Target{Arch: best}, nil
}

// Header is an in-memory header a source may #include by Name (no include path is searched:
// kernels include nothing from the CUDA toolkit).
type Header struct {
	Name, Source string
}

// Compiled is NVRTC's output for one program.
type Compiled struct {
	Image []byte // the cubin (ELF) or the PTX text (NUL-terminated, as cuModuleLoadData wants)
	Log   string // the compiler's log: warnings on success; empty when the source is clean
}

// Compile compiles src (named name in diagnostics) for t with the given options (NVRTC
// options such as -DNAME=value; the architecture option is added here). A compile error is an
// error wrapping ErrCompile whose text holds the log.
func (n *NVRTC) Compile(name, src string, headers []Header, t Target, options []string) (Compiled, error) {
	hs, hn := make([]string, len(headers)), make([]string, len(headers))
	for i, h := range headers {
		hs[i], hn[i] = h.Source, h.Name
	}
	hsrc, hname := newCStrings(hs), newCStrings(hn)
	defer hsrc.unpin()
	defer hname.unpin()
	var prog uintptr
	if err := n.check("nvrtcCreateProgram", n.nvrtcCreateProgram(&prog, src, name, int32(len(headers)), hsrc.array(), hname.array())); err != nil {
		return Compiled{}, fmt.Errorf("compiling %s: %w", name, err)
	}
	defer n.nvrtcDestroyProgram(&prog)

	opts := append([]string{"--gpu-architecture=" + t.String()}, options...)
	copts := newCStrings(opts)
	res := n.nvrtcCompileProgram(prog, int32(len(opts)), copts.array())
	copts.unpin()
	log, lerr := n.log(prog)
	if lerr != nil {
		return Compiled{}, fmt.Errorf("compiling %s: %w", name, lerr)
	}
	if err := n.check("nvrtcCompileProgram", res); err != nil {
		return Compiled{Log: log}, fmt.Errorf("compiling %s for %s: %w\n%s", name, t, err, log)
	}
	var img []byte
	var err error
	if t.Cubin {
		img, err = n.output(prog, "nvrtcGetCUBIN", n.nvrtcGetCUBINSize, n.nvrtcGetCUBIN)
	} else {
		img, err = n.output(prog, "nvrtcGetPTX", n.nvrtcGetPTXSize, n.nvrtcGetPTX)
	}
	if err != nil {
		return Compiled{}, fmt.Errorf("compiling %s: %w", name, err)
	}
	return Compiled{Image: img, Log: log}, nil
}

func (n *NVRTC) log(prog uintptr) (string, error) {
	b, err := n.output(prog, "nvrtcGetProgramLog", n.nvrtcGetProgramLogSize, n.nvrtcGetProgramLog)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(bytes.TrimRight(b, "\x00"))), nil
}

func (n *NVRTC) output(prog uintptr, call string, size func(uintptr, *uintptr) int32, get func(uintptr, *byte) int32) ([]byte, error) {
	var sz uintptr
	if err := n.check(call+"Size", size(prog, &sz)); err != nil {
		return nil, err
	}
	if sz == 0 {
		return nil, nil
	}
	buf := make([]byte, sz)
	if err := n.check(call, get(prog, &buf[0])); err != nil {
		return nil, err
	}
	return buf, nil
}

func (n *NVRTC) check(call string, res int32) error {
	if res == 0 {
		return nil
	}
	return &Error{Call: call, Code: res, Name: goString(n.nvrtcGetErrorString(res))}
}
