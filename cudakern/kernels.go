package cudakern

import (
	"embed"
	"fmt"
	"strconv"
)

//go:embed kernels/*.cu kernels/*.cuh
var kernelFS embed.FS

// Unit is one kernel source file: a compilation unit and a module on the device.
type Unit struct {
	Name    string   // file name under kernels/, e.g. "norm.cu"
	Source  string   // its text
	Kernels []Kernel // the extern "C" kernels it defines, with their signatures
}

// headerNames are the in-memory headers every unit may include.
var headerNames = []string{"common.cuh"}

func ptrP(name string) Param   { return Param{name, Ptr} }
func intP(name string) Param   { return Param{name, Int} }
func floatP(name string) Param { return Param{name, Float} }

// unitTable is the host's record of every kernel: its unit and C signature. The launch
// planners fill arguments in this order, and the tests check it against the PTX NVRTC makes of
// each unit (names and parameter types), so a kernel and its launches cannot drift apart.
var unitTable = []struct {
	name    string
	kernels []Kernel
}{
	{"norm.cu", []Kernel{
		{"embed", []Param{ptrP("h"), ptrP("table"), ptrP("ids"), intP("n"), intP("cols"), intP("vocab")}},
		{"rmsnorm", []Param{ptrP("out"), ptrP("x"), ptrP("w"), intP("n"), intP("cols"), floatP("eps")}},
		{"residual_norm", []Param{ptrP("h"), ptrP("o"), ptrP("w_post"), ptrP("w_mid"), ptrP("w_next"), ptrP("x_out"),
			ptrP("gate_w"), floatP("gate_b"), ptrP("gate_out"), intP("n"), intP("cols"), floatP("eps")}},
		{"cast_rows", []Param{ptrP("out"), ptrP("x"), intP("n"), intP("cols")}},
	}},
	{"rope.cu", []Kernel{
		{"rope_kv", []Param{ptrP("q"), intP("ldq"), ptrP("k"), intP("ldk"), ptrP("v"), intP("ldv"), ptrP("pos"), ptrP("tab_off"),
			ptrP("page_tab"), intP("layer_off"), ptrP("k_pool"), ptrP("v_pool"), ptrP("rope_cs"), intP("rope_len"), ptrP("inv_freq"),
			intP("n"), intP("nh"), intP("nkv")}},
		{"kv_copy", []Param{ptrP("k_pool"), ptrP("v_pool"), ptrP("page_tab"), ptrP("src_off"), ptrP("src_pos"),
			ptrP("dst_off"), ptrP("dst_pos"), intP("m"), intP("kv_dim")}},
	}},
	{"attention.cu", []Kernel{
		{"attn_decode", []Param{ptrP("part_o"), ptrP("part_ml"), ptrP("q"), intP("ldq"), ptrP("k_pool"), ptrP("v_pool"),
			ptrP("page_tab"), ptrP("tab_off"), intP("layer_off"), ptrP("pos"), ptrP("rows"), intP("n"), intP("nh"), intP("nkv"),
			intP("chunk"), floatP("scale")}},
		{"attn_combine", []Param{ptrP("out"), intP("ldo"), ptrP("part_o"), ptrP("part_ml"), ptrP("rows"), intP("n"), intP("nh"), intP("splits")}},
		{"attn_prefill", []Param{ptrP("out"), intP("ldo"), ptrP("q"), intP("ldq"), ptrP("k_pool"), ptrP("v_pool"),
			ptrP("page_tab"), ptrP("tab_off"), intP("layer_off"), ptrP("pos"), ptrP("tiles"), intP("ntiles"), intP("nh"), intP("nkv"), floatP("scale")}},
	}},
	{"matmul.cu", []Kernel{
		{"matmul_rows", []Param{ptrP("out"), intP("ldo"), ptrP("x"), intP("ldx"), ptrP("w"), intP("n"), intP("N"), intP("K")}},
		{"swiglu", []Param{ptrP("out"), ptrP("g"), intP("ldg"), ptrP("u"), intP("ldu"), intP("n"), intP("cols")}},
	}},
	{"select.cu", []Kernel{
		{"exit_decide", []Param{ptrP("st"), ptrP("slot"), ptrP("step"), ptrP("gate_logit"), ptrP("cum_out"), ptrP("chosen_out"), intP("n"), intP("R")}},
		{"topk", []Param{ptrP("ids"), ptrP("vals"), ptrP("lse"), ptrP("score_id"), ptrP("score_out"), ptrP("logits"),
			intP("ld"), intP("n"), intP("vocab"), intP("k")}},
		{"gather_rows", []Param{ptrP("dst"), ptrP("src"), ptrP("idx"), intP("m"), intP("cols")}},
		{"scatter_rows", []Param{ptrP("dst"), ptrP("src"), ptrP("idx"), intP("m"), intP("cols")}},
	}},
}

// Units lists the embedded kernel sources with their kernels.
func Units() []Unit {
	out := make([]Unit, 0, len(unitTable))
	for _, u := range unitTable {
		src, err := kernelFS.ReadFile("kernels/" + u.name)
		if err != nil {
			panic(fmt.Sprintf("cudakern: embedded kernel %s: %v", u.name, err)) // the build embeds every file of the table
		}
		out = append(out, Unit{Name: u.name, Source: string(src), Kernels: u.kernels})
	}
	return out
}

// Headers lists the in-memory headers the units include.
func Headers() []Header {
	out := make([]Header, 0, len(headerNames))
	for _, n := range headerNames {
		src, err := kernelFS.ReadFile("kernels/" + n)
		if err != nil {
			panic(fmt.Sprintf("cudakern: embedded header %s: %v", n, err))
		}
		out = append(out, Header{Name: n, Source: string(src)})
	}
	return out
}

// Spec is what the kernels are compiled for: the model's head width and the numeric modes
// are compile-time constants (NVRTC specialises the kernels at start-up), the rest are
// arguments.
type Spec struct {
	HeadDim int  // attention head width: even, 2..256
	KVPage  int  // positions per KV cache page: a power of two, 1..1024
	ActBF16 bool // GEMM inputs in bf16 (the serving mode); false: f32 (the check mode)
	KVBF16  bool // KV cache in bf16; false: f32
}

// DefaultKVPage is the KV page size the backend uses unless told otherwise.
const DefaultKVPage = 16

// Validate reports a spec the kernels cannot be built for.
func (s Spec) Validate() error {
	switch {
	case s.HeadDim < 2 || s.HeadDim > 256 || s.HeadDim%2 != 0:
		return fmt.Errorf("head dim %d: want an even width in 2..256", s.HeadDim)
	case s.KVPage < 1 || s.KVPage > 1024 || s.KVPage&(s.KVPage-1) != 0:
		return fmt.Errorf("KV page %d: want a power of two in 1..1024", s.KVPage)
	}
	return nil
}

// Options are the NVRTC options that compile the kernels for s.
func (s Spec) Options() []string {
	b := func(v bool) string {
		if v {
			return "1"
		}
		return "0"
	}
	return []string{
		"-std=c++17",
		"-DLS_HEAD_DIM=" + strconv.Itoa(s.HeadDim),
		"-DLS_KV_PAGE=" + strconv.Itoa(s.KVPage),
		"-DLS_ACT_BF16=" + b(s.ActBF16),
		"-DLS_KV_BF16=" + b(s.KVBF16),
	}
}

func (s Spec) String() string {
	act, kv := "f32", "f32"
	if s.ActBF16 {
		act = "bf16"
	}
	if s.KVBF16 {
		kv = "bf16"
	}
	return fmt.Sprintf("head dim %d, KV page %d, activations %s, KV %s", s.HeadDim, s.KVPage, act, kv)
}

// lookupKernel finds a kernel's signature in the table.
func lookupKernel(name string) (Kernel, bool) {
	for _, u := range unitTable {
		for _, k := range u.kernels {
			if k.Name == name {
				return k, true
			}
		}
	}
	return Kernel{}, false
}
