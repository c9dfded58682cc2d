package cudakern

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"time"
)

// Image is one unit compiled for one target.
type Image struct {
	Unit   string
	Target Target
	Data   []byte        // cubin or PTX
	Log    string        // NVRTC's log (empty for a clean compile; empty for a cache hit)
	Cached bool          // read from the cache instead of compiled
	Took   time.Duration // compile (or cache read) time
	// CacheErr is why the image could not be stored in the cache (nil when it was, or when
	// there is no cache): worth a warning, not a failure.
	CacheErr error
}

// Build compiles every embedded unit for spec and t, through the cache when there is one
// (cache may be nil). Units compile in parallel, up to GOMAXPROCS at a time. A unit that does
// not compile fails the build with its log (ErrCompile); an unwritable cache does not (see
// Image.CacheErr).
func Build(ctx context.Context, nv *NVRTC, cache *Cache, spec Spec, t Target) ([]Image, error) {
	if err := spec.Validate(); err != nil {
		return nil, fmt.Errorf("building kernels: %w", err)
	}
	units, headers, opts := Units(), Headers(), spec.Options()
	major, minor := nv.Version()
	images := make([]Image, len(units))
	errs := make([]error, len(units))
	sem := make(chan struct{}, max(1, runtime.GOMAXPROCS(0)))
	var wg sync.WaitGroup
	for k, u := range units {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				errs[k] = ctx.Err()
				return
			}
			defer func() { <-sem }()
			if err := ctx.Err(); err != nil {
				errs[k] = err
				return
			}
			start := time.Now()
			key := CacheKey(major, minor, u, headers, t, opts)
			if img, ok := cache.Load(key); ok {
				images[k] = Image{Unit: u.Name, Target: t, Data: img, Cached: true, Took: time.Since(start)}
				return
			}
			c, err := nv.Compile(u.Name, u.Source, headers, t, opts)
			if err != nil {
				errs[k] = fmt.Errorf("building kernels (%s): %w", spec, err)
				return
			}
			images[k] = Image{Unit: u.Name, Target: t, Data: c.Image, Log: c.Log, Took: time.Since(start),
				CacheErr: cache.Store(key, c.Image)}
		}()
	}
	wg.Wait()
	for _, e := range errs {
		if e != nil {
			return nil, e
		}
	}
	return images, nil
}
