package cudakern

import (
	"fmt"
	"math"
	"runtime"
	"slices"
	"strings"
	"unsafe"
)

// Dim3 is a grid or block shape.
type Dim3 struct{ X, Y, Z uint32 }

// ParamKind is the type of a kernel parameter as a launch passes it.
type ParamKind uint8

// The parameter kinds of cudakern's kernels.
const (
	Ptr   ParamKind = iota + 1 // a device address (8 bytes)
	Int                        // int32
	Float                      // float32
)

func (k ParamKind) String() string {
	switch k {
	case Ptr:
		return "ptr"
	case Int:
		return "int"
	case Float:
		return "float"
	}
	return fmt.Sprintf("ParamKind(%d)", int(k))
}

// Args are a launch's argument values in parameter order. Each value sits in its own 8-byte
// slot; the launch hands the driver a pointer to each (cuLaunchKernel's kernelParams), so no
// packing or alignment is computed here: the driver copies each parameter by the size the
// kernel declares. A value that does not fit its kind is recorded and fails the launch.
type Args struct {
	kinds []ParamKind
	vals  []uint64
	err   error
}

// Ptr appends a device address.
func (a *Args) Ptr(p DevicePtr) *Args { return a.add(Ptr, uint64(p)) }

// Int appends an int32; values outside its range fail the launch.
func (a *Args) Int(v int) *Args {
	if v < math.MinInt32 || v > math.MaxInt32 {
		if a.err == nil {
			a.err = fmt.Errorf("argument %d: %d does not fit an int32: %w", len(a.kinds), v, ErrLaunch)
		}
	}
	return a.add(Int, uint64(uint32(int32(v))))
}

// Float appends a float32.
func (a *Args) Float(v float32) *Args { return a.add(Float, uint64(math.Float32bits(v))) }

func (a *Args) add(k ParamKind, v uint64) *Args {
	a.kinds = append(a.kinds, k)
	a.vals = append(a.vals, v)
	return a
}

// Kinds lists the kinds appended so far.
func (a *Args) Kinds() []ParamKind { return slices.Clone(a.kinds) }

// Values lists the values appended so far, as the launch passes them: a device address, an
// int32's bits (sign-extended through uint32) or a float32's bits, in the low bits. Hosts that
// execute launches without a device (a test interpreter) decode them with Kinds.
func (a *Args) Values() []uint64 { return slices.Clone(a.vals) }

// Err is the first argument that did not fit its kind, or nil.
func (a *Args) Err() error { return a.err }

// Kernel is a kernel's name and parameter list: the host's record of its C signature, which
// the tests check against what NVRTC compiled.
type Kernel struct {
	Name   string
	Params []Param
}

// Param is one kernel parameter.
type Param struct {
	Name string
	Kind ParamKind
}

func (k Kernel) kinds() []ParamKind {
	out := make([]ParamKind, len(k.Params))
	for i, p := range k.Params {
		out[i] = p.Kind
	}
	return out
}

func (k Kernel) String() string {
	var b strings.Builder
	b.WriteString(k.Name + "(")
	for i, p := range k.Params {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(p.Kind.String() + " " + p.Name)
	}
	return b.String() + ")"
}

// Launch is one planned kernel launch: what Kernels.Run queues.
type Launch struct {
	Kernel      string
	Grid, Block Dim3
	Shared      uint32 // dynamic shared memory, bytes
	Args        Args
}

// Hardware limits every launch is checked against before it reaches the driver.
const (
	maxBlockThreads = 1024
	maxGridY        = 65535
	maxGridZ        = 65535
	defaultShared   = 48 << 10 // dynamic shared memory without opting in
)

// check validates l against k's signature and the launch limits (maxShared: the dynamic
// shared memory the function was allowed).
func (l *Launch) check(k Kernel, maxShared int) error {
	if l.Args.err != nil {
		return fmt.Errorf("%s: %w", l.Kernel, l.Args.err)
	}
	if !slices.Equal(l.Args.kinds, k.kinds()) {
		return fmt.Errorf("%s: arguments (%v) do not match %v: %w", l.Kernel, l.Args.kinds, k, ErrLaunch)
	}
	g, b := l.Grid, l.Block
	switch {
	case g.X == 0 || g.Y == 0 || g.Z == 0 || b.X == 0 || b.Y == 0 || b.Z == 0:
		return fmt.Errorf("%s: empty grid %v or block %v: %w", l.Kernel, g, b, ErrLaunch)
	case g.Y > maxGridY || g.Z > maxGridZ:
		return fmt.Errorf("%s: grid %v beyond %d in y or z: %w", l.Kernel, g, maxGridY, ErrLaunch)
	case uint64(b.X)*uint64(b.Y)*uint64(b.Z) > maxBlockThreads:
		return fmt.Errorf("%s: block %v over %d threads: %w", l.Kernel, b, maxBlockThreads, ErrLaunch)
	case int(l.Shared) > maxShared:
		return fmt.Errorf("%s: %d bytes of shared memory, %d allowed: %w", l.Kernel, l.Shared, maxShared, ErrLaunch)
	}
	return nil
}

// Kernels are the loaded kernel modules of one context, with the planner that shapes their
// launches. Safe for concurrent use; launches go to the stream given.
type Kernels struct {
	Planner
	mods  []*Module
	funcs map[string]loaded
}

type loaded struct {
	fn        Function
	sig       Kernel
	maxShared int
}

// LoadKernels loads the images Build made (in the current context) and resolves every kernel
// of the table. p.MaxShared is the device's opt-in shared memory limit; kernels that need more
// than 48 KiB for p.Spec are allowed what they need.
func LoadKernels(d *Driver, images []Image, p Planner) (*Kernels, error) {
	k := &Kernels{Planner: p, funcs: map[string]loaded{}}
	units := map[string]Unit{}
	for _, u := range Units() {
		units[u.Name] = u
	}
	for _, img := range images {
		u, ok := units[img.Unit]
		if !ok {
			k.Unload()
			return nil, fmt.Errorf("loading kernels: unknown unit %q", img.Unit)
		}
		m, err := d.LoadModule(img.Data)
		if err != nil {
			k.Unload()
			return nil, fmt.Errorf("loading kernels %s (%s): %w", img.Unit, img.Target, err)
		}
		k.mods = append(k.mods, m)
		for _, sig := range u.Kernels {
			fn, err := m.Function(sig.Name)
			if err != nil {
				k.Unload()
				return nil, fmt.Errorf("loading kernels %s: %w", img.Unit, err)
			}
			lim := defaultShared
			if need := p.sharedNeed(sig.Name); need > defaultShared {
				if need > p.maxShared() {
					k.Unload()
					return nil, fmt.Errorf("kernel %s needs %d bytes of shared memory, the device allows %d: %w", sig.Name, need, p.maxShared(), ErrLaunch)
				}
				if err := fn.SetMaxDynamicShared(need); err != nil {
					k.Unload()
					return nil, fmt.Errorf("kernel %s: %w", sig.Name, err)
				}
				lim = need
			}
			k.funcs[sig.Name] = loaded{fn: fn, sig: sig, maxShared: lim}
		}
	}
	for _, u := range Units() {
		for _, sig := range u.Kernels {
			if _, ok := k.funcs[sig.Name]; !ok {
				k.Unload()
				return nil, fmt.Errorf("loading kernels: no image for unit %s (kernel %s)", u.Name, sig.Name)
			}
		}
	}
	return k, nil
}

// Run queues a planned launch on s after checking it against the kernel's signature and
// limits (a mismatch is ErrLaunch, never a fault on the device).
func (k *Kernels) Run(s *Stream, l Launch) error {
	f, ok := k.funcs[l.Kernel]
	if !ok {
		return fmt.Errorf("kernel %q: not loaded: %w", l.Kernel, ErrLaunch)
	}
	if err := l.check(f.sig, f.maxShared); err != nil {
		return err
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	params := make([]unsafe.Pointer, len(l.Args.vals))
	if len(params) > 0 {
		pin.Pin(&l.Args.vals[0])
		pin.Pin(&params[0])
		for i := range l.Args.vals {
			params[i] = unsafe.Pointer(&l.Args.vals[i])
		}
	}
	return f.fn.launch(s, l.Grid, l.Block, l.Shared, params)
}

// Unload releases the modules.
func (k *Kernels) Unload() {
	for _, m := range k.mods {
		_ = m.Unload()
	}
	k.mods = nil
}
