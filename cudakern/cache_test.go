package cudakern

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestCacheKey(t *testing.T) {
	u := Unit{Name: "norm.cu", Source: "src"}
	hs := []Header{{"common.cuh", "hdr"}}
	tg := Target{Arch: 90, Cubin: true}
	opts := []string{"-DA=1", "-DB"}
	base := CacheKey(11, 8, u, hs, tg, opts)
	if base != CacheKey(11, 8, u, []Header{{"common.cuh", "hdr"}}, tg, []string{"-DA=1", "-DB"}) {
		t.Fatal("equal inputs gave different keys")
	}
	if len(base) != 64 {
		t.Fatalf("key %q is not a hex SHA-256", base)
	}
	for name, key := range map[string]string{
		"NVRTC major":       CacheKey(12, 8, u, hs, tg, opts),
		"NVRTC minor":       CacheKey(11, 7, u, hs, tg, opts),
		"unit name":         CacheKey(11, 8, Unit{Name: "rope.cu", Source: "src"}, hs, tg, opts),
		"source":            CacheKey(11, 8, Unit{Name: "norm.cu", Source: "src "}, hs, tg, opts),
		"header source":     CacheKey(11, 8, u, []Header{{"common.cuh", "hdr2"}}, tg, opts),
		"header name":       CacheKey(11, 8, u, []Header{{"other.cuh", "hdr"}}, tg, opts),
		"no header":         CacheKey(11, 8, u, nil, tg, opts),
		"arch":              CacheKey(11, 8, u, hs, Target{Arch: 80, Cubin: true}, opts),
		"PTX, not cubin":    CacheKey(11, 8, u, hs, Target{Arch: 90}, opts),
		"option order":      CacheKey(11, 8, u, hs, tg, []string{"-DB", "-DA=1"}),
		"option boundaries": CacheKey(11, 8, u, hs, tg, []string{"-DA=1-DB"}),
		"no options":        CacheKey(11, 8, u, hs, tg, nil),
	} {
		if key == base {
			t.Errorf("changing the %s kept the key", name)
		}
	}
}

func TestCacheStoreLoad(t *testing.T) {
	c := &Cache{Dir: filepath.Join(t.TempDir(), "nested", "cache")}
	key := CacheKey(11, 8, Unit{Name: "x.cu", Source: "s"}, nil, Target{Arch: 90, Cubin: true}, nil)
	if _, ok := c.Load(key); ok {
		t.Fatal("hit in an empty cache")
	}
	img := []byte("\x7fELF image bytes")
	if err := c.Store(key, img); err != nil {
		t.Fatal(err)
	}
	got, ok := c.Load(key)
	if !ok || !bytes.Equal(got, img) {
		t.Fatalf("Load = %q, %v; want the stored image", got, ok)
	}
	entries, _ := os.ReadDir(c.Dir)
	if len(entries) != 1 {
		t.Errorf("cache folder holds %d files, want only the entry (no temporary left)", len(entries))
	}

	// A damaged entry is a miss, and storing again repairs it.
	path := c.path(key)
	raw, _ := os.ReadFile(path)
	for name, bad := range map[string][]byte{
		"flipped byte": append([]byte{raw[0] ^ 1}, raw[1:]...),
		"truncated":    raw[:len(raw)-1],
		"tiny":         raw[:5],
		"empty":        nil,
	} {
		if err := os.WriteFile(path, bad, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, ok := c.Load(key); ok {
			t.Errorf("%s entry was a hit", name)
		}
	}
	if err := c.Store(key, img); err != nil {
		t.Fatal(err)
	}
	if got, ok := c.Load(key); !ok || !bytes.Equal(got, img) {
		t.Errorf("after repair Load = %q, %v", got, ok)
	}

	// No folder, no cache: nothing stored, nothing found, no error.
	for _, off := range []*Cache{nil, {}} {
		if err := off.Store(key, img); err != nil {
			t.Errorf("disabled cache Store: %v", err)
		}
		if _, ok := off.Load(key); ok {
			t.Error("disabled cache hit")
		}
	}
}

func TestCacheUnwritable(t *testing.T) {
	file := filepath.Join(t.TempDir(), "a-file")
	touch(t, file, "")
	c := &Cache{Dir: filepath.Join(file, "cache")}
	if err := c.Store("k", []byte("img")); err == nil {
		t.Error("storing under a file succeeded")
	}
}

func TestDefaultCache(t *testing.T) {
	t.Setenv(CacheEnv, "/srv/kernels")
	if got := DefaultCache().Dir; got != "/srv/kernels" {
		t.Errorf("with %s set: %q", CacheEnv, got)
	}
	t.Setenv(CacheEnv, "")
	t.Setenv("XDG_CACHE_HOME", "/var/cache/u")
	if got := DefaultCache().Dir; got != "/var/cache/u/loopserve/cudakern" {
		t.Errorf("with XDG_CACHE_HOME: %q", got)
	}
}

// TestBuildUsesCache: a second build of the same spec and target reads every unit from the
// cache, byte for byte what NVRTC made; a damaged entry is recompiled; another spec is not a
// hit; an unwritable cache does not fail the build.
func TestBuildUsesCache(t *testing.T) {
	nv := testNVRTC(t)
	ctx := context.Background()
	c := &Cache{Dir: t.TempDir()}
	spec := Spec{HeadDim: 32, KVPage: 16}
	tg := Target{Arch: 90, Cubin: true}
	first, err := Build(ctx, nv, c, spec, tg)
	if err != nil {
		t.Fatal(err)
	}
	second, err := Build(ctx, nv, c, spec, tg)
	if err != nil {
		t.Fatal(err)
	}
	for k := range first {
		if first[k].Cached || !second[k].Cached {
			t.Errorf("%s: cached %v then %v, want false then true", first[k].Unit, first[k].Cached, second[k].Cached)
		}
		if !bytes.Equal(first[k].Data, second[k].Data) || first[k].CacheErr != nil {
			t.Errorf("%s: cached image differs from the compiled one (store error %v)", first[k].Unit, first[k].CacheErr)
		}
	}

	u := Units()[0]
	major, minor := nv.Version()
	key := CacheKey(major, minor, u, Headers(), tg, spec.Options())
	if err := os.WriteFile(c.path(key), []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	third, err := Build(ctx, nv, c, spec, tg)
	if err != nil {
		t.Fatal(err)
	}
	if third[0].Cached || !bytes.Equal(third[0].Data, first[0].Data) || !third[1].Cached {
		t.Errorf("after damaging %s: cached %v (want false, recompiled), next unit cached %v", u.Name, third[0].Cached, third[1].Cached)
	}
	if img, ok := c.Load(key); !ok || !bytes.Equal(img, first[0].Data) {
		t.Error("the recompiled image was not written back")
	}

	other, err := Build(ctx, nv, c, Spec{HeadDim: 32, KVPage: 16, KVBF16: true}, tg)
	if err != nil {
		t.Fatal(err)
	}
	for _, img := range other {
		if img.Cached {
			t.Errorf("%s: another spec hit the cache", img.Unit)
		}
	}

	file := filepath.Join(t.TempDir(), "a-file")
	touch(t, file, "")
	imgs, err := Build(ctx, nv, &Cache{Dir: filepath.Join(file, "x")}, spec, tg)
	if err != nil {
		t.Fatalf("an unwritable cache failed the build: %v", err)
	}
	if imgs[0].CacheErr == nil || len(imgs[0].Data) == 0 {
		t.Errorf("unwritable cache: image %d bytes, CacheErr %v; want the image and the error", len(imgs[0].Data), imgs[0].CacheErr)
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := Build(cancelled, nv, nil, spec, tg); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled build: %v", err)
	}
	if _, err := Build(ctx, nv, nil, Spec{HeadDim: 3, KVPage: 16}, tg); err == nil {
		t.Error("an invalid spec built")
	}
}
