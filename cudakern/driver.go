package cudakern

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

// Driver is the CUDA driver API (libcuda.so.1), bound through purego: no cgo, so the binary
// builds with CGO_ENABLED=0 and runs wherever the library is present. Safe for concurrent use.
//
// CUDA makes a context current per OS thread: a goroutine that calls into CUDA must be locked
// to its thread with the context current (Context.Bind does both). Handles (streams, events,
// modules, graphs, memory) belong to the context they were made in; each type's Destroy/Free
// releases it and must be called once, after the last use, by their owner.
type Driver struct {
	lib     *library
	version int

	cuInit                    func(flags uint32) int32
	cuDriverGetVersion        func(v *int32) int32
	cuGetErrorName            func(res int32, s **byte) int32
	cuDeviceGetCount          func(n *int32) int32
	cuDeviceGet               func(d *int32, ordinal int32) int32
	cuDeviceGetName           func(name *byte, n int32, d int32) int32
	cuDeviceGetAttribute      func(v *int32, attr int32, d int32) int32
	cuDeviceTotalMem          func(bytes *uintptr, d int32) int32
	cuDevicePrimaryCtxRetain  func(ctx *uintptr, d int32) int32
	cuDevicePrimaryCtxRelease func(d int32) int32
	cuCtxSetCurrent           func(ctx uintptr) int32
	cuCtxSynchronize          func() int32
	cuMemGetInfo              func(free, total *uintptr) int32
	cuMemAlloc                func(p *uint64, bytes uintptr) int32
	cuMemFree                 func(p uint64) int32
	cuMemAllocHost            func(p *unsafe.Pointer, bytes uintptr) int32
	cuMemFreeHost             func(p unsafe.Pointer) int32
	cuMemcpyHtoD              func(dst uint64, src unsafe.Pointer, n uintptr) int32
	cuMemcpyDtoH              func(dst unsafe.Pointer, src uint64, n uintptr) int32
	cuMemcpyHtoDAsync         func(dst uint64, src unsafe.Pointer, n uintptr, s uintptr) int32
	cuMemcpyDtoHAsync         func(dst unsafe.Pointer, src uint64, n uintptr, s uintptr) int32
	cuMemcpyDtoDAsync         func(dst, src uint64, n uintptr, s uintptr) int32
	cuMemsetD32Async          func(dst uint64, v uint32, n uintptr, s uintptr) int32
	cuStreamCreate            func(s *uintptr, flags uint32) int32
	cuStreamDestroy           func(s uintptr) int32
	cuStreamSynchronize       func(s uintptr) int32
	cuStreamWaitEvent         func(s, e uintptr, flags uint32) int32
	cuEventCreate             func(e *uintptr, flags uint32) int32
	cuEventDestroy            func(e uintptr) int32
	cuEventRecord             func(e, s uintptr) int32
	cuEventSynchronize        func(e uintptr) int32
	cuEventQuery              func(e uintptr) int32
	cuEventElapsedTime        func(ms *float32, start, end uintptr) int32
	cuModuleLoadData          func(m *uintptr, image unsafe.Pointer) int32
	cuModuleUnload            func(m uintptr) int32
	cuModuleGetFunction       func(f *uintptr, m uintptr, name string) int32
	cuFuncSetAttribute        func(f uintptr, attr int32, v int32) int32
	cuFuncGetAttribute        func(v *int32, attr int32, f uintptr) int32
	cuStreamBeginCapture      func(s uintptr, mode int32) int32
	cuStreamEndCapture        func(s uintptr, g *uintptr) int32
	cuGraphInstantiate        func(exec *uintptr, g uintptr, flags uint64) int32
	cuGraphExecDestroy        func(exec uintptr) int32
	cuGraphDestroy            func(g uintptr) int32
	cuLaunchKernel            uintptr // called through ccall: the hot path
	cuGraphLaunch             uintptr
}

var (
	driverOnce sync.Once
	driverLib  *Driver
	driverErr  error
)

// LoadDriver loads libcuda.so.1 and initialises the driver, once per process. Without the
// library the error wraps ErrLibraryNotFound; without a device, ErrNoDevice (from Device).
func LoadDriver() (*Driver, error) {
	driverOnce.Do(func() { driverLib, driverErr = loadDriver(driverNames) })
	return driverLib, driverErr
}

func loadDriver(names []string) (*Driver, error) {
	lib, err := openLibrary(names)
	if err != nil {
		return nil, fmt.Errorf("loading the CUDA driver: %w", err)
	}
	d := &Driver{lib: lib}
	b := binder{lib: lib}
	b.bind(&d.cuInit, "cuInit")
	b.bind(&d.cuDriverGetVersion, "cuDriverGetVersion")
	b.bind(&d.cuGetErrorName, "cuGetErrorName")
	b.bind(&d.cuDeviceGetCount, "cuDeviceGetCount")
	b.bind(&d.cuDeviceGet, "cuDeviceGet")
	b.bind(&d.cuDeviceGetName, "cuDeviceGetName")
	b.bind(&d.cuDeviceGetAttribute, "cuDeviceGetAttribute")
	b.bind(&d.cuDeviceTotalMem, "cuDeviceTotalMem_v2")
	b.bind(&d.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain")
	b.bind(&d.cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease")
	b.bind(&d.cuCtxSetCurrent, "cuCtxSetCurrent")
	b.bind(&d.cuCtxSynchronize, "cuCtxSynchronize")
	b.bind(&d.cuMemGetInfo, "cuMemGetInfo_v2")
	b.bind(&d.cuMemAlloc, "cuMemAlloc_v2")
	b.bind(&d.cuMemFree, "cuMemFree_v2")
	b.bind(&d.cuMemAllocHost, "cuMemAllocHost_v2")
	b.bind(&d.cuMemFreeHost, "cuMemFreeHost")
	b.bind(&d.cuMemcpyHtoD, "cuMemcpyHtoD_v2")
	b.bind(&d.cuMemcpyDtoH, "cuMemcpyDtoH_v2")
	b.bind(&d.cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2")
	b.bind(&d.cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2")
	b.bind(&d.cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2")
	b.bind(&d.cuMemsetD32Async, "cuMemsetD32Async")
	b.bind(&d.cuStreamCreate, "cuStreamCreate")
	b.bind(&d.cuStreamDestroy, "cuStreamDestroy_v2")
	b.bind(&d.cuStreamSynchronize, "cuStreamSynchronize")
	b.bind(&d.cuStreamWaitEvent, "cuStreamWaitEvent")
	b.bind(&d.cuEventCreate, "cuEventCreate")
	b.bind(&d.cuEventDestroy, "cuEventDestroy_v2")
	b.bind(&d.cuEventRecord, "cuEventRecord")
	b.bind(&d.cuEventSynchronize, "cuEventSynchronize")
	b.bind(&d.cuEventQuery, "cuEventQuery")
	b.bind(&d.cuEventElapsedTime, "cuEventElapsedTime_v2", "cuEventElapsedTime")
	b.bind(&d.cuModuleLoadData, "cuModuleLoadData")
	b.bind(&d.cuModuleUnload, "cuModuleUnload")
	b.bind(&d.cuModuleGetFunction, "cuModuleGetFunction")
	b.bind(&d.cuFuncSetAttribute, "cuFuncSetAttribute")
	b.bind(&d.cuFuncGetAttribute, "cuFuncGetAttribute")
	b.bind(&d.cuStreamBeginCapture, "cuStreamBeginCapture_v2")
	b.bind(&d.cuStreamEndCapture, "cuStreamEndCapture")
	b.bind(&d.cuGraphInstantiate, "cuGraphInstantiateWithFlags")
	b.bind(&d.cuGraphExecDestroy, "cuGraphExecDestroy")
	b.bind(&d.cuGraphDestroy, "cuGraphDestroy")
	if b.err != nil {
		return nil, fmt.Errorf("loading the CUDA driver: %w", b.err)
	}
	if d.cuLaunchKernel, err = lib.symbol("cuLaunchKernel"); err != nil {
		return nil, fmt.Errorf("loading the CUDA driver: %w", err)
	}
	if d.cuGraphLaunch, err = lib.symbol("cuGraphLaunch"); err != nil {
		return nil, fmt.Errorf("loading the CUDA driver: %w", err)
	}
	if err := d.check("cuInit", d.cuInit(0)); err != nil {
		return nil, fmt.Errorf("initialising the CUDA driver (%s): %w", lib.path, err)
	}
	var v int32
	if err := d.check("cuDriverGetVersion", d.cuDriverGetVersion(&v)); err != nil {
		return nil, err
	}
	d.version = int(v)
	return d, nil
}

// Version is the driver's CUDA version as major·1000 + minor·10 (13000 for CUDA 13.0).
func (d *Driver) Version() int { return d.version }

// Path is the file the driver was loaded from (or its soname, when the loader found it).
func (d *Driver) Path() string { return d.lib.path }

func (d *Driver) check(call string, res int32) error {
	if res == cudaSuccess {
		return nil
	}
	name := cuResultName(res)
	var s *byte
	if d.cuGetErrorName != nil && d.cuGetErrorName(res, &s) == cudaSuccess && s != nil {
		name = goString(s)
	}
	return &Error{Call: call, Code: res, Name: name}
}

// DeviceCount is the number of CUDA devices the driver sees.
func (d *Driver) DeviceCount() (int, error) {
	var n int32
	if err := d.check("cuDeviceGetCount", d.cuDeviceGetCount(&n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// Device is a CUDA device by ordinal.
type Device struct {
	d   *Driver
	dev int32
}

// Device returns device ordinal; an ordinal the driver does not have is ErrNoDevice.
func (d *Driver) Device(ordinal int) (Device, error) {
	n, err := d.DeviceCount()
	if err != nil {
		return Device{}, err
	}
	if ordinal < 0 || ordinal >= n {
		return Device{}, fmt.Errorf("device %d of %d: %w", ordinal, n, ErrNoDevice)
	}
	var dev int32
	if err := d.check("cuDeviceGet", d.cuDeviceGet(&dev, int32(ordinal))); err != nil {
		return Device{}, err
	}
	return Device{d: d, dev: dev}, nil
}

// DeviceAttribute is a CUdevice_attribute.
type DeviceAttribute int32

// The device attributes cudakern reads.
const (
	AttrMaxThreadsPerBlock     DeviceAttribute = 1
	AttrMaxSharedPerBlock      DeviceAttribute = 8
	AttrWarpSize               DeviceAttribute = 10
	AttrMultiprocessorCount    DeviceAttribute = 16
	AttrMemoryClockRate        DeviceAttribute = 36 // kHz
	AttrGlobalMemoryBusWidth   DeviceAttribute = 37 // bits
	AttrL2CacheSize            DeviceAttribute = 38 // bytes
	AttrComputeCapabilityMajor DeviceAttribute = 75
	AttrComputeCapabilityMinor DeviceAttribute = 76
	AttrMaxSharedPerBlockOptin DeviceAttribute = 97
)

// Attribute reads one device attribute.
func (v Device) Attribute(a DeviceAttribute) (int, error) {
	var x int32
	if err := v.d.check("cuDeviceGetAttribute", v.d.cuDeviceGetAttribute(&x, int32(a), v.dev)); err != nil {
		return 0, fmt.Errorf("device attribute %d: %w", a, err)
	}
	return int(x), nil
}

// Props are the device facts the backend plans with.
type Props struct {
	Name              string
	ComputeCapability int // major·10 + minor, e.g. 90
	SMs               int
	TotalMem          uint64
	MaxSharedOptin    int // dynamic shared memory a block may opt in to, bytes
	L2Bytes           int
	MemClockKHz       int
	BusWidthBits      int
}

// PeakBandwidth is the memory bandwidth implied by the clock and bus width (double data
// rate), bytes per second; 0 when the driver does not report them.
func (p Props) PeakBandwidth() float64 {
	return 2 * float64(p.MemClockKHz) * 1e3 * float64(p.BusWidthBits) / 8
}

// Props reads the device's name, compute capability, size and limits.
func (v Device) Props() (Props, error) {
	var p Props
	name := make([]byte, 256)
	if err := v.d.check("cuDeviceGetName", v.d.cuDeviceGetName(&name[0], int32(len(name)), v.dev)); err != nil {
		return p, err
	}
	p.Name = goString(&name[0])
	var total uintptr
	if err := v.d.check("cuDeviceTotalMem", v.d.cuDeviceTotalMem(&total, v.dev)); err != nil {
		return p, err
	}
	p.TotalMem = uint64(total)
	attrs := []struct {
		a   DeviceAttribute
		dst *int
	}{
		{AttrMultiprocessorCount, &p.SMs}, {AttrMaxSharedPerBlockOptin, &p.MaxSharedOptin},
		{AttrL2CacheSize, &p.L2Bytes}, {AttrMemoryClockRate, &p.MemClockKHz}, {AttrGlobalMemoryBusWidth, &p.BusWidthBits},
	}
	for _, a := range attrs {
		x, err := v.Attribute(a.a)
		if err != nil {
			return p, err
		}
		*a.dst = x
	}
	major, err := v.Attribute(AttrComputeCapabilityMajor)
	if err != nil {
		return p, err
	}
	minor, err := v.Attribute(AttrComputeCapabilityMinor)
	if err != nil {
		return p, err
	}
	p.ComputeCapability = major*10 + minor
	return p, nil
}

// Context is a device's primary context (the one the CUDA runtime and cuBLASLt share).
type Context struct {
	d   *Driver
	dev int32
	ctx uintptr
}

// RetainPrimaryContext retains the device's primary context; Release undoes it.
func (v Device) RetainPrimaryContext() (*Context, error) {
	var c uintptr
	if err := v.d.check("cuDevicePrimaryCtxRetain", v.d.cuDevicePrimaryCtxRetain(&c, v.dev)); err != nil {
		return nil, err
	}
	return &Context{d: v.d, dev: v.dev, ctx: c}, nil
}

// Bind locks the calling goroutine to its OS thread and makes the context current there;
// unbind unlocks it. Every CUDA call of the goroutine must happen between the two.
func (c *Context) Bind() (unbind func(), err error) {
	runtime.LockOSThread()
	if err := c.d.check("cuCtxSetCurrent", c.d.cuCtxSetCurrent(c.ctx)); err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	return runtime.UnlockOSThread, nil
}

// Synchronize waits for all work of the context.
func (c *Context) Synchronize() error { return c.d.check("cuCtxSynchronize", c.d.cuCtxSynchronize()) }

// MemInfo is the device memory free and in total, bytes.
func (c *Context) MemInfo() (free, total uint64, err error) {
	var f, t uintptr
	if err := c.d.check("cuMemGetInfo", c.d.cuMemGetInfo(&f, &t)); err != nil {
		return 0, 0, err
	}
	return uint64(f), uint64(t), nil
}

// Release releases the primary context retained by RetainPrimaryContext.
func (c *Context) Release() error {
	return c.d.check("cuDevicePrimaryCtxRelease", c.d.cuDevicePrimaryCtxRelease(c.dev))
}

// DevicePtr is a device address (CUdeviceptr). Its memory is owned by whoever allocated it.
type DevicePtr uint64

// Add offsets the address by bytes.
func (p DevicePtr) Add(bytes int) DevicePtr { return p + DevicePtr(bytes) }

// Alloc allocates bytes of device memory (in the current context); CUDA_ERROR_OUT_OF_MEMORY
// is an error matching ErrOutOfMemory. Free it with Free.
func (d *Driver) Alloc(bytes int) (DevicePtr, error) {
	var p uint64
	if err := d.check("cuMemAlloc", d.cuMemAlloc(&p, uintptr(bytes))); err != nil {
		return 0, fmt.Errorf("allocating %d bytes of device memory: %w", bytes, err)
	}
	return DevicePtr(p), nil
}

// Free frees memory from Alloc.
func (d *Driver) Free(p DevicePtr) error { return d.check("cuMemFree", d.cuMemFree(uint64(p))) }

// Pinned is page-locked host memory (cuMemAllocHost): the only host memory the asynchronous
// copies take, because the device reads or writes it after the call returns. It is C memory,
// outside the Go heap; Free it with Driver.FreePinned after the last copy using it completed.
type Pinned struct {
	p unsafe.Pointer
	n int
}

// AllocPinned allocates bytes of pinned host memory.
func (d *Driver) AllocPinned(bytes int) (Pinned, error) {
	var p unsafe.Pointer
	if err := d.check("cuMemAllocHost", d.cuMemAllocHost(&p, uintptr(bytes))); err != nil {
		return Pinned{}, fmt.Errorf("allocating %d bytes of pinned host memory: %w", bytes, err)
	}
	return Pinned{p: p, n: bytes}, nil
}

// FreePinned frees memory from AllocPinned.
func (d *Driver) FreePinned(h Pinned) error { return d.check("cuMemFreeHost", d.cuMemFreeHost(h.p)) }

// Len is the size in bytes.
func (h Pinned) Len() int { return h.n }

// Bytes is the memory as a byte slice (valid until FreePinned).
func (h Pinned) Bytes() []byte { return unsafe.Slice((*byte)(h.p), h.n) }

// Int32s is the memory as int32s (its size rounded down).
func (h Pinned) Int32s() []int32 { return unsafe.Slice((*int32)(h.p), h.n/4) }

// Float32s is the memory as float32s (its size rounded down).
func (h Pinned) Float32s() []float32 { return unsafe.Slice((*float32)(h.p), h.n/4) }

// Slice is bytes [off, off+n) of the memory.
func (h Pinned) Slice(off, n int) Pinned {
	if off < 0 || n < 0 || off+n > h.n {
		panic(fmt.Sprintf("cudakern: pinned slice [%d:%d] of %d bytes", off, off+n, h.n))
	}
	return Pinned{p: unsafe.Add(h.p, off), n: n}
}

// CopyToDevice copies src (any host memory) to dst, synchronously.
func (d *Driver) CopyToDevice(dst DevicePtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	return d.check("cuMemcpyHtoD", d.cuMemcpyHtoD(uint64(dst), unsafe.Pointer(&src[0]), uintptr(len(src))))
}

// CopyFromDevice copies len(dst) bytes from src to dst, synchronously.
func (d *Driver) CopyFromDevice(dst []byte, src DevicePtr) error {
	if len(dst) == 0 {
		return nil
	}
	return d.check("cuMemcpyDtoH", d.cuMemcpyDtoH(unsafe.Pointer(&dst[0]), uint64(src), uintptr(len(dst))))
}

// AsBytes views a slice of plain values (float32, int32, uint16, ExitState...) as bytes, for
// the synchronous copies.
func AsBytes[T any](s []T) []byte {
	if len(s) == 0 {
		return nil
	}
	var z T
	return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), len(s)*int(unsafe.Sizeof(z)))
}

// Stream is a CUDA stream: work on it runs in order, asynchronously to the host.
type Stream struct {
	d *Driver
	s uintptr
}

// NewStream creates a stream that does not synchronise with the legacy default stream.
func (d *Driver) NewStream() (*Stream, error) {
	var s uintptr
	const nonBlocking = 1
	if err := d.check("cuStreamCreate", d.cuStreamCreate(&s, nonBlocking)); err != nil {
		return nil, err
	}
	return &Stream{d: d, s: s}, nil
}

// Destroy releases the stream (work already queued still completes).
func (s *Stream) Destroy() error { return s.d.check("cuStreamDestroy", s.d.cuStreamDestroy(s.s)) }

// Synchronize waits until the stream's work is done.
func (s *Stream) Synchronize() error {
	return s.d.check("cuStreamSynchronize", s.d.cuStreamSynchronize(s.s))
}

// Wait makes later work on s wait for e.
func (s *Stream) Wait(e *Event) error {
	return s.d.check("cuStreamWaitEvent", s.d.cuStreamWaitEvent(s.s, e.e, 0))
}

// CopyToDeviceAsync queues a copy of src to dst.
func (s *Stream) CopyToDeviceAsync(dst DevicePtr, src Pinned) error {
	if src.n == 0 {
		return nil
	}
	return s.d.check("cuMemcpyHtoDAsync", s.d.cuMemcpyHtoDAsync(uint64(dst), src.p, uintptr(src.n), s.s))
}

// CopyFromDeviceAsync queues a copy of dst.Len() bytes from src into dst.
func (s *Stream) CopyFromDeviceAsync(dst Pinned, src DevicePtr) error {
	if dst.n == 0 {
		return nil
	}
	return s.d.check("cuMemcpyDtoHAsync", s.d.cuMemcpyDtoHAsync(dst.p, uint64(src), uintptr(dst.n), s.s))
}

// CopyAsync queues a device-to-device copy of bytes.
func (s *Stream) CopyAsync(dst, src DevicePtr, bytes int) error {
	if bytes == 0 {
		return nil
	}
	return s.d.check("cuMemcpyDtoDAsync", s.d.cuMemcpyDtoDAsync(uint64(dst), uint64(src), uintptr(bytes), s.s))
}

// Fill32Async queues setting n 32-bit words at dst to v (e.g. math.Float32bits(x)).
func (s *Stream) Fill32Async(dst DevicePtr, v uint32, n int) error {
	if n == 0 {
		return nil
	}
	return s.d.check("cuMemsetD32Async", s.d.cuMemsetD32Async(uint64(dst), v, uintptr(n), s.s))
}

// CaptureMode is a CUstreamCaptureMode.
type CaptureMode int32

// Stream capture modes.
const (
	CaptureGlobal      CaptureMode = 0
	CaptureThreadLocal CaptureMode = 1
	CaptureRelaxed     CaptureMode = 2
)

// BeginCapture starts recording the stream's work into a graph instead of running it.
func (s *Stream) BeginCapture(mode CaptureMode) error {
	return s.d.check("cuStreamBeginCapture", s.d.cuStreamBeginCapture(s.s, int32(mode)))
}

// EndCapture stops recording and returns the graph (the caller destroys it).
func (s *Stream) EndCapture() (*Graph, error) {
	var g uintptr
	if err := s.d.check("cuStreamEndCapture", s.d.cuStreamEndCapture(s.s, &g)); err != nil {
		return nil, err
	}
	return &Graph{d: s.d, g: g}, nil
}

// Graph is a recorded CUDA graph.
type Graph struct {
	d *Driver
	g uintptr
}

// Instantiate makes an executable graph of g (g may be destroyed afterwards).
func (g *Graph) Instantiate() (*GraphExec, error) {
	var e uintptr
	if err := g.d.check("cuGraphInstantiate", g.d.cuGraphInstantiate(&e, g.g, 0)); err != nil {
		return nil, err
	}
	return &GraphExec{d: g.d, e: e}, nil
}

// Destroy releases the graph.
func (g *Graph) Destroy() error { return g.d.check("cuGraphDestroy", g.d.cuGraphDestroy(g.g)) }

// GraphExec is an instantiated graph: one launch replays all its kernels and copies.
type GraphExec struct {
	d *Driver
	e uintptr
}

// Launch queues the graph on s.
func (e *GraphExec) Launch(s *Stream) error {
	return e.d.check("cuGraphLaunch", int32(ccall(e.d.cuGraphLaunch, e.e, s.s)))
}

// Destroy releases the executable graph.
func (e *GraphExec) Destroy() error {
	return e.d.check("cuGraphExecDestroy", e.d.cuGraphExecDestroy(e.e))
}

// Event marks a point in a stream.
type Event struct {
	d *Driver
	e uintptr
}

// NewEvent creates an event; timing adds timestamps (for Elapsed), at some cost.
func (d *Driver) NewEvent(timing bool) (*Event, error) {
	var flags uint32 = 2 // CU_EVENT_DISABLE_TIMING
	if timing {
		flags = 0
	}
	var e uintptr
	if err := d.check("cuEventCreate", d.cuEventCreate(&e, flags)); err != nil {
		return nil, err
	}
	return &Event{d: d, e: e}, nil
}

// Record marks the current end of s's work.
func (e *Event) Record(s *Stream) error {
	return e.d.check("cuEventRecord", e.d.cuEventRecord(e.e, s.s))
}

// Synchronize waits until the recorded work is done.
func (e *Event) Synchronize() error {
	return e.d.check("cuEventSynchronize", e.d.cuEventSynchronize(e.e))
}

// Done reports whether the recorded work is done, without waiting.
func (e *Event) Done() (bool, error) {
	switch res := e.d.cuEventQuery(e.e); res {
	case cudaSuccess:
		return true, nil
	case cudaErrorNotReady:
		return false, nil
	default:
		return false, e.d.check("cuEventQuery", res)
	}
}

// Elapsed is the time from start to e, milliseconds (both timing events, both done).
func (e *Event) Elapsed(start *Event) (float32, error) {
	var ms float32
	if err := e.d.check("cuEventElapsedTime", e.d.cuEventElapsedTime(&ms, start.e, e.e)); err != nil {
		return 0, err
	}
	return ms, nil
}

// Destroy releases the event.
func (e *Event) Destroy() error { return e.d.check("cuEventDestroy", e.d.cuEventDestroy(e.e)) }

// Module is a loaded cubin or PTX image.
type Module struct {
	d *Driver
	m uintptr
}

// LoadModule loads a cubin, or PTX (which the driver compiles for the device).
func (d *Driver) LoadModule(image []byte) (*Module, error) {
	if len(image) == 0 {
		return nil, fmt.Errorf("loading module: empty image: %w", ErrLaunch)
	}
	if !isELF(image) && image[len(image)-1] != 0 { // PTX text must be NUL-terminated
		image = append(image[:len(image):len(image)], 0)
	}
	var m uintptr
	if err := d.check("cuModuleLoadData", d.cuModuleLoadData(&m, unsafe.Pointer(&image[0]))); err != nil {
		return nil, err
	}
	return &Module{d: d, m: m}, nil
}

func isELF(b []byte) bool { return len(b) >= 4 && string(b[:4]) == "\x7fELF" }

// Function looks up a kernel by its (extern "C") name.
func (m *Module) Function(name string) (Function, error) {
	var f uintptr
	if err := m.d.check("cuModuleGetFunction", m.d.cuModuleGetFunction(&f, m.m, name)); err != nil {
		return Function{}, fmt.Errorf("kernel %s: %w", name, err)
	}
	return Function{d: m.d, f: f, name: name}, nil
}

// Unload releases the module and its functions.
func (m *Module) Unload() error { return m.d.check("cuModuleUnload", m.d.cuModuleUnload(m.m)) }

// Function is a kernel of a loaded module.
type Function struct {
	d    *Driver
	f    uintptr
	name string
}

const (
	funcAttrMaxThreadsPerBlock = 0
	funcAttrNumRegs            = 4
	funcAttrMaxDynamicShared   = 8
)

// SetMaxDynamicShared lets launches of f use up to bytes of dynamic shared memory (needed
// above 48 KiB).
func (f Function) SetMaxDynamicShared(bytes int) error {
	return f.d.check("cuFuncSetAttribute", f.d.cuFuncSetAttribute(f.f, funcAttrMaxDynamicShared, int32(bytes)))
}

// MaxThreadsPerBlock is the largest block f can be launched with (its register use decides).
func (f Function) MaxThreadsPerBlock() (int, error) {
	var v int32
	if err := f.d.check("cuFuncGetAttribute", f.d.cuFuncGetAttribute(&v, funcAttrMaxThreadsPerBlock, f.f)); err != nil {
		return 0, err
	}
	return int(v), nil
}

// launch queues f on s. params holds one pointer per kernel parameter to its value; the
// caller keeps them pinned for the call (the driver copies the values before returning).
func (f Function) launch(s *Stream, grid, block Dim3, shared uint32, params []unsafe.Pointer) error {
	var pp unsafe.Pointer
	if len(params) > 0 {
		pp = unsafe.Pointer(&params[0])
	}
	res := ccall(f.d.cuLaunchKernel, f.f,
		uintptr(grid.X), uintptr(grid.Y), uintptr(grid.Z),
		uintptr(block.X), uintptr(block.Y), uintptr(block.Z),
		uintptr(shared), s.s, uintptr(pp), 0)
	runtime.KeepAlive(params)
	if err := f.d.check("cuLaunchKernel", int32(res)); err != nil {
		return fmt.Errorf("launching %s: %w", f.name, err)
	}
	return nil
}
