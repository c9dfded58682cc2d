package cuda

import (
	"context"
	"errors"
	"fmt"

	"github.com/loopserve/loopserve/cudakern"
)

// device is the driver calls the backend makes at load time: device memory, synchronous
// writes, and the queues streams run on. gpu implements it over cudakern; the tests use an
// interpreter that executes the planned launches on the CPU.
//
// Ownership: the backend frees every allocation it makes before Close; a queue's work is
// done (Sync) before the memory it uses is freed.
type device interface {
	Alloc(bytes int) (cudakern.DevicePtr, error)
	Free(p cudakern.DevicePtr)
	// Write copies src to dst and returns when the copy is done.
	Write(dst cudakern.DevicePtr, src []byte) error
	// MemInfo is the device's free and total memory, bytes.
	MemInfo() (free, total uint64, err error)
	Planner() cudakern.Planner
	NewQueue() (queue, error)
	Close() error
}

// queue is one ordered device stream. Every call observes the effects of the calls before it;
// Download and Sync wait for all of them. Not safe for concurrent use (a Stream's).
type queue interface {
	// Upload queues copying src to dst; src may be reused when Upload returns.
	Upload(dst cudakern.DevicePtr, src []byte) error
	// Copy queues a device-to-device copy.
	Copy(dst, src cudakern.DevicePtr, bytes int) error
	Launch(l cudakern.Launch) error
	// Download waits for the queued work and copies src into dst.
	Download(dst []byte, src cudakern.DevicePtr) error
	Sync() error
	Close() error
}

// gpu is device over the CUDA driver: device 0's primary context, kernels compiled by NVRTC
// for its architecture (cached on disk).
type gpu struct {
	d       *cudakern.Driver
	ctx     *cudakern.Context
	props   cudakern.Props
	kernels *cudakern.Kernels
	planner cudakern.Planner
}

// openGPU loads the driver and NVRTC, retains device ordinal's context and builds the kernels
// for spec. A missing library is an error wrapping cudakern.ErrLibraryNotFound that names it.
func openGPU(ctx context.Context, ordinal int, spec cudakern.Spec) (*gpu, error) {
	d, err := cudakern.LoadDriver()
	if err != nil {
		return nil, err
	}
	dev, err := d.Device(ordinal)
	if err != nil {
		return nil, err
	}
	props, err := dev.Props()
	if err != nil {
		return nil, err
	}
	nv, err := cudakern.LoadNVRTC()
	if err != nil {
		return nil, err
	}
	target, err := nv.Target(props.ComputeCapability)
	if err != nil {
		return nil, err
	}
	imgs, err := cudakern.Build(ctx, nv, cudakern.DefaultCache(), spec, target)
	if err != nil {
		return nil, err
	}
	c, err := dev.RetainPrimaryContext()
	if err != nil {
		return nil, err
	}
	g := &gpu{d: d, ctx: c, props: props, planner: cudakern.Planner{Spec: spec, MaxShared: props.MaxSharedOptin}}
	err = g.bound(func() error {
		g.kernels, err = cudakern.LoadKernels(d, imgs, g.planner)
		return err
	})
	if err != nil {
		_ = c.Release()
		return nil, fmt.Errorf("loading kernels on %s: %w", props.Name, err)
	}
	return g, nil
}

// bound runs f with the context current on the calling goroutine's thread.
func (g *gpu) bound(f func() error) error {
	unbind, err := g.ctx.Bind()
	if err != nil {
		return err
	}
	defer unbind()
	return f()
}

func (g *gpu) Alloc(bytes int) (p cudakern.DevicePtr, err error) {
	err = g.bound(func() error { p, err = g.d.Alloc(max(bytes, 4)); return err })
	return p, err
}

func (g *gpu) Free(p cudakern.DevicePtr) {
	_ = g.bound(func() error { return g.d.Free(p) })
}

func (g *gpu) Write(dst cudakern.DevicePtr, src []byte) error {
	return g.bound(func() error { return g.d.CopyToDevice(dst, src) })
}

func (g *gpu) MemInfo() (free, total uint64, err error) {
	err = g.bound(func() error { free, total, err = g.ctx.MemInfo(); return err })
	return free, total, err
}

func (g *gpu) Planner() cudakern.Planner { return g.planner }

func (g *gpu) NewQueue() (queue, error) {
	q := &gpuQueue{g: g}
	err := g.bound(func() (err error) { q.s, err = g.d.NewStream(); return err })
	if err != nil {
		return nil, err
	}
	return q, nil
}

func (g *gpu) Close() error {
	err := g.bound(func() error { g.kernels.Unload(); return g.ctx.Synchronize() })
	return errors.Join(err, g.ctx.Release())
}

// gpuQueue is a driver stream with a pinned staging buffer for uploads: staged bytes are
// reused only after a Download or Sync has waited for the copies that read them.
type gpuQueue struct {
	g      *gpu
	s      *cudakern.Stream
	pinned cudakern.Pinned
	used   int
}

func (q *gpuQueue) Upload(dst cudakern.DevicePtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	return q.g.bound(func() error {
		if q.used+len(src) > q.pinned.Len() {
			if err := q.s.Synchronize(); err != nil {
				return err
			}
			q.used = 0
			if len(src) > q.pinned.Len() {
				if q.pinned.Len() > 0 {
					if err := q.g.d.FreePinned(q.pinned); err != nil {
						return err
					}
				}
				p, err := q.g.d.AllocPinned(max(len(src), 1<<20))
				if err != nil {
					q.pinned = cudakern.Pinned{}
					return err
				}
				q.pinned = p
			}
		}
		stage := q.pinned.Slice(q.used, len(src))
		copy(stage.Bytes(), src)
		q.used += (len(src) + 255) &^ 255
		return q.s.CopyToDeviceAsync(dst, stage)
	})
}

func (q *gpuQueue) Copy(dst, src cudakern.DevicePtr, bytes int) error {
	return q.g.bound(func() error { return q.s.CopyAsync(dst, src, bytes) })
}

func (q *gpuQueue) Launch(l cudakern.Launch) error {
	return q.g.bound(func() error { return q.g.kernels.Run(q.s, l) })
}

func (q *gpuQueue) Download(dst []byte, src cudakern.DevicePtr) error {
	return q.g.bound(func() error {
		if err := q.s.Synchronize(); err != nil {
			return err
		}
		q.used = 0
		return q.g.d.CopyFromDevice(dst, src)
	})
}

func (q *gpuQueue) Sync() error {
	return q.g.bound(func() error { q.used = 0; return q.s.Synchronize() })
}

func (q *gpuQueue) Close() error {
	return q.g.bound(func() error {
		err := q.s.Synchronize()
		if q.pinned.Len() > 0 {
			err = errors.Join(err, q.g.d.FreePinned(q.pinned))
		}
		return errors.Join(err, q.s.Destroy())
	})
}
